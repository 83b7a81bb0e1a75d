#!/usr/bin/env python3
"""Delete the Sparkify S3 bucket: every object, every version and delete marker, then the bucket.

    python delete_s3.py BUCKET [--yes] [--region R]

Asks for confirmation unless --yes.  Deletes in batches of 1,000 with pagination, so buckets of
any size (versioned or not) go.  Honours S3_ENDPOINT_URL.  Exit 0 when the bucket is gone, 1 when
you decline, 2 with a one-line message on a missing bucket or an S3 error.
"""
from __future__ import annotations

import argparse
import os
import sys

import etl
from create_s3 import client_for

BATCH = 1000


def next_batch(client, bucket: str) -> list:
    """Up to 1,000 {Key, VersionId} still in the bucket: versions and delete markers first, then
    plain objects (for servers whose version listing is incomplete).  Listing from the start after
    each delete keeps pagination from skipping or repeating keys."""
    page = client.list_object_versions(Bucket=bucket, MaxKeys=BATCH)
    items = [{"Key": v["Key"], "VersionId": v["VersionId"]}
             for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
    if items:
        return items[:BATCH]
    page = client.list_objects_v2(Bucket=bucket, MaxKeys=BATCH)
    return [{"Key": o["Key"]} for o in page.get("Contents", [])]


def empty_bucket(client, bucket: str) -> int:
    deleted = 0
    while True:
        batch = next_batch(client, bucket)
        if not batch:
            return deleted
        resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        errors = resp.get("Errors", [])
        if errors:
            first = errors[0]
            raise etl.UsageError(f"could not delete {len(errors)} objects, e.g. {first.get('Key')}: "
                                 f"{first.get('Code')} {first.get('Message', '')}".rstrip())
        deleted += len(batch)
        print(f"  deleted {deleted:,} objects and versions", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="delete_s3.py", description=__doc__.split("\n\n")[0])
    p.add_argument("bucket")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--region", help="bucket region (default: AWS_REGION, dl.cfg, or us-east-1)")
    p.add_argument("--config", help="config file (default: dl.cfg beside etl.py)")
    args = p.parse_args(argv)
    try:
        client, cfg = client_for(args.region, args.config)
        client.head_bucket(Bucket=args.bucket)
        if not args.yes:
            try:
                answer = input(f"Delete bucket {args.bucket} and everything in it? Type its name to confirm: ")
            except EOFError:
                answer = ""
            if answer.strip() != args.bucket:
                print("not deleted (pass --yes to skip this question)", file=sys.stderr)
                return 1
        n = empty_bucket(client, args.bucket)
        client.delete_bucket(Bucket=args.bucket)
        print(f"bucket {args.bucket} deleted ({n:,} objects and versions removed)")
        return 0
    except etl.UsageError as e:
        print(f"delete_s3.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"delete_s3.py: error: {etl.describe_aws_error(e, args.bucket, os.environ.get('S3_ENDPOINT_URL'))}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
