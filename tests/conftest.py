"""One SparkSession for the whole suite, deliberately in a non-UTC time zone (JVM and session)
and with ANSI mode on, so that every test also proves the job does not depend on either."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import etl  # noqa: E402

SAMPLE = os.path.join(ROOT, "data")
NON_UTC = "America/Los_Angeles"


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    etl.ensure_java()
    builder = (SparkSession.builder.master("local[2]").appName("sparkify-tests")
               .config("spark.driver.extraJavaOptions", f"-Duser.timezone={NON_UTC}")
               .config("spark.executor.extraJavaOptions", f"-Duser.timezone={NON_UTC}")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.ansi.enabled", "true"))
    for key, value in etl.spark_settings(small=True).items():  # as `python etl.py` runs a small input
        builder = builder.config(key, value)
    # The job's local file system, as `python etl.py` uses it (where a JDK can build it).
    classes = etl.local_fs_classes()
    if classes:
        builder = builder.config("spark.driver.extraClassPath", classes).config("spark.hadoop.fs.file.impl",
                                                                          etl.LOCAL_FS_CLASS)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    # The session time zone too: the transforms must not rely on spark_settings' UTC.
    session.conf.set("spark.sql.session.timeZone", NON_UTC)
    yield session
    session.stop()


@pytest.fixture(autouse=True)
def _restore_session_conf(request):
    """Tests that change the session's SQL settings get them back afterwards."""
    yield
    if "spark" in request.fixturenames:
        s = request.getfixturevalue("spark")
        s.conf.set("spark.sql.shuffle.partitions", "2")
        s.conf.set("spark.sql.session.timeZone", NON_UTC)


LOG_FIELDS = [f.name for f in etl.log_schema().fields if f.name != etl.CORRUPT]
SONG_FIELDS = [f.name for f in etl.song_schema().fields if f.name != etl.CORRUPT]


def event(**kw):
    """One log event with sensible defaults (a NextSong play by user 1)."""
    base = dict(artist="Artist", auth="Logged In", firstName="Ann", gender="F", itemInSession=0,
                lastName="Lee", length=200.0, level="free", location="Here", method="PUT",
                page="NextSong", registration=1.5e12, sessionId=1, song="Song", status=200,
                ts=1541990258796, userAgent="UA", userId="1")
    base.update(kw)
    return tuple(base[f] for f in LOG_FIELDS)


def song(**kw):
    base = dict(num_songs=1, artist_id="AR1", artist_latitude=None, artist_longitude=None,
                artist_location="", artist_name="Artist", song_id="SO1", title="Song",
                duration=200.0, year=2000)
    base.update(kw)
    return tuple(base[f] for f in SONG_FIELDS)


def _schema_without_corrupt(schema):
    from pyspark.sql import types as T

    return T.StructType([f for f in schema.fields if f.name != etl.CORRUPT])


@pytest.fixture
def events_df(spark):
    def make(*rows):
        return spark.createDataFrame(list(rows), _schema_without_corrupt(etl.log_schema()))
    return make


@pytest.fixture
def songs_df(spark):
    def make(*rows):
        return spark.createDataFrame(list(rows), _schema_without_corrupt(etl.song_schema()))
    return make


def run_job(spark, input_dir, output_dir, *extra):
    """The job in process on the shared session, as `etl.py --input … --output …` runs it."""
    cfg = etl.load_config(["--input", str(input_dir), "--output", str(output_dir), *extra], environ={})
    return etl.run(cfg, spark)


# The one line the JVM itself prints at start under pyspark 4 (its launcher always adds
# --add-modules=jdk.incubator.vector); not a log line, and no setting turns it off.
JVM_BANNER = "WARNING: Using incubator modules: jdk.incubator.vector"


def job_lines(stderr: str) -> list:
    """stderr of a CLI run without the JVM's start-up banner."""
    return [ln for ln in stderr.splitlines() if ln.strip() != JVM_BANNER]


@pytest.fixture(scope="session")
def sample_lake(spark, tmp_path_factory):
    """The lake built from the bundled sample, once for the session; tests only read it."""
    out = tmp_path_factory.mktemp("lake") / "output"
    assert run_job(spark, SAMPLE, out) == 0
    return str(out)


@pytest.fixture(scope="session")
def sample_answers(spark, sample_lake):
    """Every query's answer on the sample lake: {name: (columns, rows)}."""
    import analytics

    return analytics.run_queries(spark, sample_lake)


@pytest.fixture(scope="session")
def analytics_cli(sample_lake, tmp_path_factory):
    """`analytics.py --lake <sample lake> --charts DIR` as a user runs it: (its result, DIR)."""
    import subprocess

    charts = tmp_path_factory.mktemp("charts") / "charts"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "analytics.py"), "--lake", sample_lake,
                        "--charts", str(charts)], env=dict(os.environ, SPARK_LOCAL_IP="127.0.0.1"),
                       capture_output=True, text=True, timeout=300, check=False)
    return r, charts


def read_tables(spark, out):
    return {t: spark.read.parquet(os.path.join(str(out), t)) for t in etl.TABLES}


def table_rows(spark, out):
    """Every table's rows, sorted, timestamps as epoch milliseconds: for whole-table equality."""
    result = {}
    for name, df in read_tables(spark, out).items():
        cols = [f"unix_millis({c}) AS {c}" if t == "timestamp" else c for c, t in df.dtypes]
        result[name] = sorted((tuple(r) for r in df.selectExpr(*sorted(cols)).collect()),
                              key=lambda r: tuple((v is None, v) for v in r))
    return result


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback for the whole session."""
    import s3server

    server = s3server.start(str(tmp_path_factory.mktemp("seaweedfs")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def two_months(tmp_path_factory):
    """The sample logs with days 16-30 moved 30 days later, into log_data/2018/12/."""
    inp = tmp_path_factory.mktemp("two") / "in"
    shutil.copytree(os.path.join(SAMPLE, "song_data"), inp / "song_data")
    src = os.path.join(SAMPLE, "log_data", "2018", "11")
    for name in sorted(os.listdir(src)):
        day = int(name[8:10])
        with open(os.path.join(src, name)) as f:
            events = [json.loads(ln) for ln in f if ln.strip()]
        month = "11" if day <= 15 else "12"
        target = inp / "log_data" / "2018" / month
        target.mkdir(parents=True, exist_ok=True)
        for e in events:
            e["ts"] += 0 if month == "11" else 30 * 86_400_000
        (target / f"2018-{month}-{day:02d}-events.json").write_text(
            "".join(json.dumps(e) + "\n" for e in events))
    return inp


@pytest.fixture(scope="session")
def two_months_lake(spark, two_months, tmp_path_factory):
    """One full run over two_months; tests only read it."""
    out = tmp_path_factory.mktemp("two-lake") / "lake"
    assert run_job(spark, two_months, out) == 0
    return out


def manifest_rows(out):
    with open(os.path.join(out, "_manifest.json")) as f:
        return {name: t["rows"] for name, t in json.load(f)["tables"].items()}
