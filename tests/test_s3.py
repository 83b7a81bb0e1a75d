"""S3 end to end against a real S3 server on loopback (SeaweedFS): the bucket helpers, etl.py on
s3:// from a local session, credential and endpoint errors, and secrets kept out of logs and files."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE, manifest_rows, table_rows

import create_s3
import s3server
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


def test_create_is_idempotent_and_delete_removes_more_than_a_thousand_objects(s3, tmp_path):
    name = bucket_name()
    first = tool("create_s3.py", name, env_extra=s3.env())
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    again = tool("create_s3.py", name, "--region", "us-east-1", env_extra=s3.env())
    assert again.returncode == 0, again.stderr
    assert "already exists" in again.stdout
    client = s3.client()
    for i in range(1100):  # uploaded by the helper's own parallel uploader
        d = tmp_path / "song_data" / f"{i % 26:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.json").write_text("{}")
    assert create_s3.upload_tree(client, str(tmp_path), name, "many") == 1100
    listed = sum(p.get("KeyCount", 0) for p in client.get_paginator("list_objects_v2").paginate(Bucket=name))
    assert listed == 1100
    gone = tool("delete_s3.py", name, "--yes", env_extra=s3.env())
    assert gone.returncode == 0, gone.stderr
    assert "1,100" in gone.stdout
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


# ---- etl.py on s3:// from a local session: copy in, compute locally, upload, publish


@pytest.fixture(scope="module")
def sample_bucket(s3):
    name = bucket_name("lake")
    r = tool("create_s3.py", name, "--upload-sample", "input", env_extra=s3.env())
    assert r.returncode == 0, r.stderr
    assert "uploaded 101 sample files" in r.stdout
    return name


def s3_cfg(s3, bucket, out, *extra, endpoint=None):
    env = dict(s3.env(), **({"S3_ENDPOINT_URL": endpoint} if endpoint else {}))
    cfg = etl.load_config(["--input", f"s3://{bucket}/input", "--output", f"s3://{bucket}/{out}", *extra],
                          environ=env)
    # In process the keys come in through dl.cfg's slot (the credential chain reads the environment).
    cfg.access_key, cfg.secret_key = s3.access_key, s3.secret_key
    return cfg


def objects(s3, bucket, prefix):
    """key -> ETag of every object under prefix/."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def manifest_of(s3, bucket, prefix):
    return json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/_manifest.json")["Body"].read())


def published_keys(manifest, prefix):
    keys = {f"{prefix}/{t}/{f}" for t, v in manifest["tables"].items() for f in v["files"]}
    return keys | {f"{prefix}/_manifest.json"}


def download_lake(s3, bucket, prefix, dest):
    client = s3.client()
    for key in objects(s3, bucket, prefix):
        path = Path(dest) / key[len(prefix) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    return str(dest)


@pytest.fixture(scope="module")
def flaky_lake(spark, s3, sample_bucket):
    """A run from and to S3 through a server that answers 503 Slow Down to a fifth of first tries,
    with SSE-S3 and a canned ACL asked for: (its output prefix, the requests the server saw)."""
    with s3server.FlakyS3(s3.endpoint, every=5) as proxy:
        prefix = f"flaky-{uuid.uuid4().hex[:8]}"
        cfg = s3_cfg(s3, sample_bucket, prefix, "--sse", "AES256", "--acl", "bucket-owner-full-control",
                     endpoint=proxy.endpoint)
        assert etl.run(cfg, spark) == 0
    return prefix, proxy


@pytest.fixture
def s3_lake(s3, sample_bucket, flaky_lake):
    """A lake of its own for a test that changes it: flaky_lake's objects copied within S3."""
    prefix, client = f"lake-{uuid.uuid4().hex[:8]}", s3.client()
    for key in objects(s3, sample_bucket, flaky_lake[0]):
        client.copy_object(Bucket=sample_bucket, Key=prefix + key[len(flaky_lake[0]):],
                           CopySource={"Bucket": sample_bucket, "Key": key})
    return prefix


def test_s3_run_gives_the_same_tables_as_the_local_run_through_slow_downs(spark, s3, sample_bucket, flaky_lake,
                                                                         sample_lake, tmp_path):
    prefix, proxy = flaky_lake
    refused = [r for r in proxy.requests if r[2]]
    assert len(refused) > 30 and {m for m, *_ in refused} >= {"GET", "PUT"}
    local = download_lake(s3, sample_bucket, prefix, tmp_path / "copy")
    assert table_rows(spark, local) == table_rows(spark, sample_lake)
    manifest = manifest_of(s3, sample_bucket, prefix)
    assert manifest["tables"]["songs"]["rows"] == 71
    assert set(objects(s3, sample_bucket, prefix)) == published_keys(manifest, prefix) | {
        f"{prefix}/_state/users/{f}" for f in os.listdir(tmp_path / "copy" / "_state" / "users")}
    dirs = {k.rsplit("/", 1)[0] for k in objects(s3, sample_bucket, f"{prefix}/songs")}
    assert len(dirs) == 69 == len(manifest["tables"]["songs"]["files"])  # one file per directory


def test_every_object_is_written_with_a_checksum_the_encryption_and_the_acl_asked_for(s3, sample_bucket,
                                                                                      flaky_lake):
    prefix, proxy = flaky_lake
    puts = [(path, h, body) for method, path, h, body in proxy.sent if method == "PUT"]
    assert len(puts) > 73
    for path, headers, body in puts:
        assert headers.get("x-amz-server-side-encryption") == "AES256", path
        assert headers.get("x-amz-acl") == "bucket-owner-full-control", path
        assert headers.get("content-md5") == base64.b64encode(hashlib.md5(body).digest()).decode(), path
    client = s3.client()
    keys = objects(s3, sample_bucket, prefix)
    assert [k for k in keys if client.head_object(Bucket=sample_bucket, Key=k).get("ServerSideEncryption")
            != "AES256"] == []


def test_cli_on_s3_keeps_the_secret_out_of_logs_and_files(s3, sample_bucket, tmp_path):
    cfg_file = tmp_path / "dl.cfg"
    cfg_file.write_text(f"[AWS]\nAWS_ACCESS_KEY_ID = {s3.access_key}\nAWS_SECRET_ACCESS_KEY = {s3.secret_key}\n")
    work = tmp_path / "work"
    r = tool("etl.py", "--config", cfg_file, "--input", f"s3://{sample_bucket}/input", "--output",
             f"s3://{sample_bucket}/secret-test", "--log-level", "DEBUG", "--work-dir", work,
             env_extra={"S3_ENDPOINT_URL": s3.endpoint, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6,820" in r.stdout
    assert s3.secret_key not in r.stdout and s3.secret_key not in r.stderr
    client = s3.client()
    for key in objects(s3, sample_bucket, "secret-test"):
        body = client.get_object(Bucket=sample_bucket, Key=key)["Body"].read()
        assert s3.secret_key.encode() not in body and s3.access_key.encode() not in body, key
    assert os.listdir(work) == []  # the working folder is removed at the end
    for d, _, files in os.walk(tmp_path):
        for f in files:
            if f != "dl.cfg":
                assert s3.secret_key.encode() not in (Path(d) / f).read_bytes(), f


def test_cli_wrong_secret_or_dead_endpoint_exits_2_with_one_line(s3, sample_bucket):
    args = ("--input", f"s3://{sample_bucket}/input", "--output", f"s3://{sample_bucket}/x")
    wrong = tool("etl.py", *args, env_extra=dict(s3.env(), AWS_SECRET_ACCESS_KEY="not-the-secret"))
    assert wrong.returncode == 2
    assert wrong.stderr.strip().count("\n") == 0 and "refused the credentials" in wrong.stderr
    assert "not-the-secret" not in wrong.stderr
    dead = tool("etl.py", *args, env_extra=dict(s3.env(), S3_ENDPOINT_URL="http://127.0.0.1:9"))
    assert dead.returncode == 2
    assert dead.stderr.strip().count("\n") == 0 and "cannot reach" in dead.stderr
    missing = tool("etl.py", "--input", f"s3://{sample_bucket}/nothing-here", env_extra=s3.env())
    assert missing.returncode == 2 and "holds no objects" in missing.stderr


def test_rerun_on_s3_replaces_every_object_and_cleans_a_killed_runs_working_folder(spark, s3, sample_bucket,
                                                                                 s3_lake, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = tmp_path / f"{etl.WORK_PREFIX}{host}-{gone.pid}-x1"
    alive = tmp_path / f"{etl.WORK_PREFIX}{host}-{os.getpid()}-x2"
    elsewhere = tmp_path / f"{etl.WORK_PREFIX}other-host.example-{gone.pid}-x3"
    for d in (dead, alive, elsewhere):
        (d / "input").mkdir(parents=True)
    first = objects(s3, sample_bucket, s3_lake)
    assert etl.run(s3_cfg(s3, sample_bucket, s3_lake, "--work-dir", str(tmp_path)), spark) == 0
    # the dead run's folder and this run's are gone; another host's pid says nothing here
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name])
    after = objects(s3, sample_bucket, s3_lake)
    manifest = manifest_of(s3, sample_bucket, s3_lake)
    assert {k for k in after if "/_state/" not in k} == published_keys(manifest, s3_lake)  # no journal, no lock
    assert not (set(first) - {f"{s3_lake}/_manifest.json"}) & set(after)  # every old object replaced


def test_a_working_folder_without_room_is_named_with_the_option_that_moves_it(spark, s3, sample_bucket,
                                                                            monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(etl.shutil, "disk_usage", lambda path: etl.shutil._ntuple_diskusage(10**9, 10**9, 10**6))
    work = tmp_path / "work"
    args = ["--input", f"s3://{sample_bucket}/input", "--output", str(tmp_path / "out"), "--work-dir", str(work)]
    monkeypatch.setenv("S3_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    assert etl.main(args, spark=spark) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"etl.py: error: the working folder {work} has 0.0 GB free") and "\n" not in err
    assert "--work-dir DIR or set SPARKIFY_WORK_DIR" in err
    assert list(work.iterdir()) == []


def test_failed_check_on_s3_uploads_nothing_and_leaves_no_working_folder(spark, s3, sample_bucket, flaky_lake,
                                                                          monkeypatch, tmp_path):
    lake = flaky_lake[0]
    before = objects(s3, sample_bucket, lake)
    real_state = etl.users_state

    def with_duplicate(events, previous_state=None):
        df = real_state(events, previous_state)
        return df.unionByName(df.orderBy("user_id").limit(1))

    monkeypatch.setattr(etl, "users_state", with_duplicate)
    with pytest.raises(etl.CheckFailed, match="users.user_id unique"):
        etl.run(s3_cfg(s3, sample_bucket, lake, "--work-dir", str(tmp_path)), spark)
    assert objects(s3, sample_bucket, lake) == before  # nothing uploaded, nothing deleted, no lock left
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("after_manifest", [False, True])
def test_interrupted_upload_is_rolled_back_or_completed(spark, s3, sample_bucket, s3_lake, monkeypatch,
                                                        after_manifest):
    before = objects(s3, sample_bucket, s3_lake)
    real_put, real_delete = etl.S3Store.put, etl.S3Store.delete

    def put_half(self, staged, keys):
        real_put(self, staged, list(keys)[: len(keys) // 2])
        raise OSError("killed (injected)")

    def delete_after_manifest(self, keys):
        if list(keys) != [etl.LOCK]:
            raise OSError("killed (injected)")
        real_delete(self, keys)

    monkeypatch.setattr(etl.S3Store, *(("delete", delete_after_manifest) if after_manifest else ("put", put_half)))
    with pytest.raises(OSError, match="injected"):
        etl.run(s3_cfg(s3, sample_bucket, s3_lake), spark)
    monkeypatch.undo()
    interrupted = objects(s3, sample_bucket, s3_lake)
    assert f"{s3_lake}/{etl.JOURNAL}" in interrupted and len(interrupted) > len(before) + 30  # new beside old
    etl.recover(etl.S3Store(s3_cfg(s3, sample_bucket, s3_lake), f"s3://{sample_bucket}/{s3_lake}"))
    after = objects(s3, sample_bucket, s3_lake)
    if after_manifest:  # completed: exactly the interrupted run's files
        assert {k for k in after if "/_state/" not in k} == published_keys(manifest_of(s3, sample_bucket, s3_lake),
                                                                          s3_lake)
    else:  # rolled back: the previous output, byte for byte
        assert after == before


def test_incremental_runs_on_s3_count_the_kept_months_in_the_manifest(spark, s3, sample_bucket, two_months,
                                                                     two_months_lake, tmp_path):
    inc = f"inc-{uuid.uuid4().hex[:8]}"
    for month in ("2018-11", "2018-12"):
        cfg = s3_cfg(s3, sample_bucket, inc, "--months", month)
        cfg.input = str(two_months)
        assert etl.run(cfg, spark) == 0
    tables = table_rows(spark, download_lake(s3, sample_bucket, inc, tmp_path / "inc"))
    assert tables == table_rows(spark, two_months_lake)
    rows = {t: v["rows"] for t, v in manifest_of(s3, sample_bucket, inc)["tables"].items()}
    assert rows == manifest_rows(two_months_lake) == {name: len(r) for name, r in tables.items()}


# ---- one writer at a time: the lock, on S3 a conditional write on every code path

TAKE_LOCK = """
import sys, time
sys.path.insert(0, sys.argv[1])
import etl
cfg = etl.load_config(["--output", sys.argv[2]])
# the output's store on every code path (a cluster's too): on S3 the lock is a conditional write
store = etl.open_store(cfg)
try:
    etl.take_lock(store, cfg, sys.argv[3])
except etl.UsageError as e:
    print("refused:", e)
    sys.exit(2)
store.write("published-by", sys.argv[3])
time.sleep(3)
store.delete([etl.LOCK])
"""


@pytest.mark.parametrize("where", ["s3", "local"])
def test_two_writers_started_at_once_one_publishes_the_other_is_refused_naming_it(s3, sample_bucket, tmp_path,
                                                                                   where):
    out = f"s3://{sample_bucket}/race-{uuid.uuid4().hex[:8]}" if where == "s3" else str(tmp_path / "lake")
    env = dict({k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}, **s3.env())
    runs = [subprocess.Popen([sys.executable, "-c", TAKE_LOCK, ROOT, out, f"run-{i}"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    winner = [code for code, _, _ in results].index(0)
    loser = next(text for code, text, _ in results if code == 2)
    assert f"is locked by run run-{winner} (host {socket.gethostname()}, pid {runs[winner].pid}) since" in loser
    assert "wait for it, or pass --force if that run crashed" in loser
    if where == "s3":
        key = f"{out.split('/', 3)[3]}/published-by"
        body = s3.client().get_object(Bucket=sample_bucket, Key=key)["Body"].read().decode()
    else:
        body = (tmp_path / "lake" / "published-by").read_text()
    assert body == f"run-{winner}"


# ---- what goes over the wire: retries, checksums, encryption, ACL


def test_sse_kms_and_its_key_are_asked_for_on_every_write(s3, sample_bucket, tmp_path):
    # The S3 server here has no KMS: it refuses the first write, and the run says so in one line.
    with s3server.FlakyS3(s3.endpoint, every=0) as proxy:
        r = tool("etl.py", "--input", str(SAMPLE), "--output", f"s3://{sample_bucket}/kms", "--sse", "aws:kms",
                 "--sse-kms-key-id", "alias/sparkify", env_extra=dict(s3.env(), S3_ENDPOINT_URL=proxy.endpoint))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    puts = [h for method, _, h, _ in proxy.sent if method == "PUT"]
    assert puts and all(h.get("x-amz-server-side-encryption") == "aws:kms" and
                        h.get("x-amz-server-side-encryption-aws-kms-key-id") == "alias/sparkify" for h in puts)
    bad = tool("etl.py", "--sse-kms-key-id", "k1", "--output", f"s3://{sample_bucket}/kms", env_extra=s3.env())
    assert bad.returncode == 2 and "needs --sse aws:kms" in bad.stderr


# ---- analytics on a lake on S3


def test_analytics_reads_a_lake_on_s3(spark, s3, sample_bucket, flaky_lake, sample_answers, monkeypatch):
    import analytics

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    on_s3 = analytics.run_queries(spark, f"s3://{sample_bucket}/{flaky_lake[0]}")
    assert on_s3 == sample_answers


def test_a_clusters_staged_tables_are_copied_into_place_on_s3_manifest_last(s3, sample_bucket, sample_lake):
    """The cluster path without a cluster: Spark there writes the tables under
    <output>/_staging/<run id>/ through its connector (here uploaded with boto3 instead); the
    publish copies them into place within S3, writes the manifest, and deletes what they replace."""
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    out = f"s3://{sample_bucket}/{prefix}"
    cfg = s3_cfg(s3, sample_bucket, prefix)
    staged = etl.LocalStore(sample_lake)
    keys = [k for name in (*etl.TABLES, "_state/users") for k in staged.list(name)]
    etl.upload(s3.client(), sample_bucket, [(staged.path(k), f"{prefix}/_staging/r1/{k}") for k in keys], {})
    old = f"{prefix}/songs/year=0/artist_id=AR0/part-old.parquet"
    s3.client().put_object(Bucket=sample_bucket, Key=old, Body=b"an earlier run's file")
    store = etl.open_store(cfg)
    with open(os.path.join(sample_lake, "_manifest.json")) as f:
        manifest = {"run_id": "r1", "rows": {t: v["rows"] for t, v in json.load(f)["tables"].items()}}
    partitions = {t: {"year=2018/month=11": manifest["rows"][t]} for t in etl.MONTHLY_TABLES}
    final = etl.publish(store, etl.S3Store(cfg, f"{out}/_staging/r1"), f"{out}/_staging/r1", manifest, {}, [],
                        partitions)
    after = objects(s3, sample_bucket, prefix)
    assert old not in after and f"{prefix}/{etl.JOURNAL}" not in after
    assert {k for k in after if "/_staging/" not in k and "/_state/" not in k} == published_keys(final, prefix)
    assert manifest_of(s3, sample_bucket, prefix)["tables"]["songs"]["rows"] == 71


def test_s3_input_to_a_local_output_leaves_no_staging_and_no_working_folder(spark, s3, sample_bucket, sample_lake,
                                                                            tmp_path):
    cfg = s3_cfg(s3, sample_bucket, "unused", "--work-dir", str(tmp_path / "work"))
    cfg.output = str(tmp_path / "lake")
    assert etl.run(cfg, spark) == 0
    assert table_rows(spark, cfg.output) == table_rows(spark, sample_lake)
    assert sorted(os.listdir(cfg.output)) == sorted([*etl.TABLES, "_manifest.json", "_state"])
    assert os.listdir(tmp_path / "work") == []
