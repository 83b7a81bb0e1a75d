#!/usr/bin/env python3
"""Create the Sparkify S3 bucket (idempotent), optionally uploading the bundled sample input.

    python create_s3.py BUCKET [--region R] [--upload-sample [PREFIX]]

Credentials: the AWS credential chain (environment, ~/.aws, instance profile), or the optional
keys in dl.cfg.  S3_ENDPOINT_URL points it at an S3-compatible server.  Exit 0 on success, 2 with
a one-line message on an invalid name, a bucket owned by someone else, bad credentials or an
unreachable endpoint.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import etl

BUCKET_RE = re.compile(r"^(?!xn--)(?!sthree-)(?!.*\.\.)(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def bucket_name_problem(name: str) -> str | None:
    if BUCKET_RE.match(name) and not name.endswith(("-s3alias", "--ol-s3")):
        return None
    return (f"{name!r} is not a valid bucket name: 3-63 characters, lower-case letters, digits, "
            "dots and hyphens, starting and ending with a letter or digit")


def client_for(region: str | None, config: str | None = None):
    """(boto3 client, Config) from the same precedence as etl.py, with --region on top."""
    cfg = etl.load_config(["--config", config] if config else [])
    if region:
        cfg.region = region
    return etl.s3_client(cfg), cfg


def create_bucket(client, bucket: str, region: str | None) -> str:
    """Create the bucket; 'created' or 'exists' (already ours).  us-east-1 takes no constraint."""
    from botocore.exceptions import ClientError

    kwargs = {"Bucket": bucket}
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
        return "created"
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code == "BucketAlreadyOwnedByYou":
            return "exists"
        if code == "BucketAlreadyExists":
            raise etl.UsageError(f"bucket {bucket} already exists and belongs to another account; "
                                 "pick another name") from None
        if code == "InvalidBucketName":
            raise etl.UsageError(bucket_name_problem(bucket) or f"{bucket!r} is not a valid bucket name") from None
        raise


def upload_tree(client, local_root: str, bucket: str, prefix: str, names=("song_data", "log_data")) -> int:
    """Upload the input folders under prefix, in parallel (many small files)."""
    jobs = []
    for name in names:
        for d, _, files in os.walk(os.path.join(local_root, name)):
            for f in sorted(files):
                path = os.path.join(d, f)
                key = "/".join(p for p in (prefix, os.path.relpath(path, local_root).replace(os.sep, "/")) if p)
                jobs.append((path, key))
    etl.upload(client, bucket, jobs, {})
    return len(jobs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="create_s3.py", description=__doc__.split("\n\n")[0])
    p.add_argument("bucket")
    p.add_argument("--region", help="bucket region (default: AWS_REGION, dl.cfg, or us-east-1)")
    p.add_argument("--upload-sample", nargs="?", const="input", metavar="PREFIX",
                   help="upload the bundled sample (data/song_data, data/log_data) under PREFIX "
                   "(default: input), ready for etl.py --input s3://BUCKET/PREFIX")
    p.add_argument("--config", help="config file (default: dl.cfg beside etl.py)")
    args = p.parse_args(argv)
    try:
        problem = bucket_name_problem(args.bucket)
        if problem:
            raise etl.UsageError(problem)
        client, cfg = client_for(args.region, args.config)
        where = cfg.endpoint_url or f"AWS region {cfg.region or 'us-east-1'}"
        state = create_bucket(client, args.bucket, cfg.region)
        print(f"bucket {args.bucket} {'created' if state == 'created' else 'already exists (yours)'} at {where}")
        if args.upload_sample is not None:
            prefix = args.upload_sample.strip("/")
            n = upload_tree(client, etl.DEFAULT_INPUT, args.bucket, prefix)
            print(f"uploaded {n} sample files to s3://{args.bucket}/{prefix}/ "
                  f"(run: python etl.py --input s3://{args.bucket}/{prefix} --output s3://{args.bucket}/lake)")
        return 0
    except etl.UsageError as e:
        print(f"create_s3.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # botocore errors: one line
        print(f"create_s3.py: error: {etl.describe_aws_error(e, args.bucket, os.environ.get('S3_ENDPOINT_URL'))}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
