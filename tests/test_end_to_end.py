"""The whole job, for real: the sample (in process and through the CLI) and the full catalogue."""
from __future__ import annotations

import datetime as dt
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from pyspark.sql import functions as F
from conftest import ROOT, SAMPLE, SHARED_DATA, hadoop_keys_after_a_run, job_lines, read_tables, run_job

import analytics
import etl

TYPES = {
    "songplays": {"songplay_id": "bigint", "start_time": "timestamp", "user_id": "bigint",
                  "level": "string", "song_id": "string", "artist_id": "string",
                  "session_id": "bigint", "location": "string", "user_agent": "string",
                  "year": "int", "month": "int"},
    "users": {"user_id": "bigint", "first_name": "string", "last_name": "string",
              "gender": "string", "level": "string"},
    "songs": {"song_id": "string", "title": "string", "artist_id": "string", "year": "int",
              "duration": "double"},
    "artists": {"artist_id": "string", "name": "string", "location": "string",
                "latitude": "double", "longitude": "double"},
    "time": {"start_time": "timestamp", "hour": "int", "day": "int", "week": "int", "month": "int",
             "year": "int", "weekday": "int"},
}


def test_sample_figures(spark, sample_lake):
    t = read_tables(spark, sample_lake)
    counts = {name: df.count() for name, df in t.items()}
    assert counts == {"songplays": 6820, "users": 97, "songs": 71, "artists": 69, "time": 6813}
    assert t["songplays"].filter("song_id IS NOT NULL").count() == 1
    assert t["songplays"].filter("artist_id IS NOT NULL").count() == 1


def test_sample_column_types(spark, sample_lake):
    for name, df in read_tables(spark, sample_lake).items():
        assert {f.name: f.dataType.simpleString() for f in df.schema.fields} == TYPES[name], name


def test_partition_directories_hold_one_parquet_file_each(sample_lake):
    layouts = {"songplays": "year=*/month=*", "songs": "year=*/artist_id=*", "time": "year=*/month=*"}
    for table, pattern in layouts.items():
        dirs = glob.glob(os.path.join(sample_lake, table, pattern))
        assert dirs, table
        for d in dirs:
            assert len(glob.glob(os.path.join(d, "*.parquet"))) == 1, d
    years = glob.glob(os.path.join(sample_lake, "songplays", "year=*"))
    assert [os.path.basename(d) for d in years] == ["year=2018"]
    assert len(glob.glob(os.path.join(sample_lake, "songs", "year=*", "artist_id=*"))) == 69
    for table in ("users", "artists"):
        assert len(glob.glob(os.path.join(sample_lake, table, "*.parquet"))) == 1


def test_forty_months_written_by_one_task_still_hold_one_file_per_directory(spark, tmp_path):
    """songplays and time are written without a sort, one file kept open per month (at most 32
    per task, spark_settings); past that Spark sorts the rest of the task's rows.  Forty months
    in one task (the sample's events spread over them) must still give one file per directory."""
    inp = tmp_path / "in"
    shutil.copytree(os.path.join(SAMPLE, "song_data"), inp / "song_data")
    src = os.path.join(SAMPLE, "log_data", "2018", "11")
    i = 0
    for name in sorted(os.listdir(src)):
        lines = []
        with open(os.path.join(src, name)) as f:
            for ln in f:
                if ln.strip():
                    e = json.loads(ln)
                    when = dt.datetime.fromtimestamp(e["ts"] / 1000, dt.timezone.utc)
                    back = when.year * 12 + when.month - 1 - i % 40  # up to 39 months back
                    when = when.replace(year=back // 12, month=back % 12 + 1, day=min(when.day, 28))
                    e["ts"] = int(when.timestamp() * 1000)
                    lines.append(json.dumps(e) + "\n")
                    i += 1
        target = inp / "log_data" / "2018" / "11"
        target.mkdir(parents=True, exist_ok=True)
        (target / name).write_text("".join(lines))
    out = tmp_path / "lake"
    assert run_job(spark, inp, out) == 0
    for table in ("songplays", "time"):
        dirs = glob.glob(os.path.join(out, table, "year=*", "month=*"))
        assert len(dirs) == 40, table
        assert [d for d in dirs if len(glob.glob(os.path.join(d, "*.parquet"))) != 1] == [], table
    assert read_tables(spark, out)["songplays"].count() == 6820


def parquet_codecs_and_encodings(spark, path: str) -> tuple:
    """The compression codecs and the encodings of a Parquet file's column chunks, from its footer."""
    jvm = spark._jvm
    meta = jvm.org.apache.parquet.hadoop.ParquetFileReader.readFooter(
        spark._jsc.hadoopConfiguration(), jvm.org.apache.hadoop.fs.Path(path))
    codecs, encodings = set(), set()
    for block in meta.getBlocks():
        for col in block.getColumns():
            codecs.add(col.getCodec().name())
            encodings |= {e.name() for e in col.getEncodings()}
    return codecs, encodings


def test_songs_files_are_plain_and_uncompressed_the_other_tables_snappy(spark, sample_lake):
    # songs: a row or two per file, written without a dictionary or a compressor
    for path in glob.glob(os.path.join(sample_lake, "songs", "year=*", "artist_id=*", "*.parquet")):
        codecs, encodings = parquet_codecs_and_encodings(spark, path)
        assert codecs == {"UNCOMPRESSED"}, path
        assert not encodings & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}, path
    # the tables of many rows per file keep Spark's default: snappy, with dictionaries.  Parquet
    # drops a column's dictionary when it does not pay, so only tables with columns of repeated
    # values are asked for one: in artists' 69 mostly distinct rows only location may keep its
    # dictionary, and it did not in one CI run on a clean machine.
    for table in ("songplays", "time", "users", "artists"):
        path = glob.glob(os.path.join(sample_lake, table, "**", "*.parquet"), recursive=True)[0]
        codecs, encodings = parquet_codecs_and_encodings(spark, path)
        assert codecs == {"SNAPPY"}, table
        if table != "artists":
            assert encodings & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}, table


def test_fast_local_file_system_is_used_and_sets_ordinary_permissions(spark, sample_lake):
    import stat

    assert etl.fast_local_fs_settings(), "javac is on this machine, so the fast file system must build"
    fs = spark._jvm.org.apache.hadoop.fs.Path(sample_lake).getFileSystem(spark._jsc.hadoopConfiguration())
    assert fs.getClass().getName() == etl.FAST_LOCAL_FS
    part = glob.glob(os.path.join(sample_lake, "songs", "year=*", "artist_id=*", "*.parquet"))[0]
    # Hadoop's default umask (fs.permissions.umask-mode) is 022
    assert stat.S_IMODE(os.stat(part).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.dirname(part)).st_mode) == 0o755
    # The raw local file system: no checksum file beside any file of the lake
    assert [f for _, _, fs in os.walk(sample_lake) for f in fs if f.endswith(".crc")] == []


def test_yarn_settings_stay_out_of_the_hadoop_configuration_after_a_run(tmp_path):
    # A JVM of the job's own (the way python etl.py starts it): the run loads the HDFS and file
    # system classes, whose default resources would reload every key removed before them.
    impl, yarn, mapreduce, _ = hadoop_keys_after_a_run(SAMPLE, str(tmp_path / "out"))
    assert (impl, yarn) == (etl.FAST_LOCAL_FS, 0)
    assert mapreduce > 100  # the rest stays


def test_manifest_is_written_last_and_describes_the_run(sample_lake):
    path = os.path.join(sample_lake, "_manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    assert {t: manifest["tables"][t]["rows"] for t in etl.TABLES} == {
        "songplays": 6820, "users": 97, "songs": 71, "artists": 69, "time": 6813}
    assert manifest["input"]["song_data"]["files"] == 71
    assert manifest["input"]["log_data"]["files"] == 30
    assert all(c["ok"] for c in manifest["checks"]) and len(manifest["checks"]) >= 10
    assert manifest["versions"]["spark"]
    data = [f for t in etl.TABLES for f in glob.glob(os.path.join(sample_lake, t, "**", "*.parquet"),
                                                       recursive=True)]
    listed = [os.path.join(sample_lake, t, f) for t in etl.TABLES for f in manifest["tables"][t]["files"]]
    assert sorted(listed) == sorted(data)
    assert os.path.getmtime(path) >= max(os.path.getmtime(f) for f in data)
    assert not os.path.exists(os.path.join(sample_lake, "_staging"))
    assert not os.path.exists(os.path.join(sample_lake, "_lock.json"))


def test_dry_run_writes_nothing(spark, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_job(spark, SAMPLE, out, "--dry-run") == 0
    assert not out.exists()
    assert "dry run" in capsys.readouterr().out


# ---- the command line, as a user runs it


def cli(*args, cwd=None, timeout=300, **extra_env):
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, **extra_env)
    for k in ("SPARKIFY_INPUT", "SPARKIFY_OUTPUT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "etl.py"), *args], cwd=cwd, env=env,
                          check=False, capture_output=True, text=True, timeout=timeout)


def test_cli_default_run_writes_sample_tables_and_prints_summary(tmp_path):
    r = cli(cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "output"
    for t in etl.TABLES:
        assert (out / t).is_dir()
    assert (out / "_manifest.json").is_file()
    lines = r.stdout.splitlines()
    table_lines = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.strip() and ln.split()[0] in etl.TABLES}
    assert table_lines["songplays"][0] == "6,820" and table_lines["time"][0] == "6,813"
    for t, (_rows, files, seconds) in table_lines.items():
        assert int(files.replace(",", "")) >= 1 and float(seconds) >= 0, t
    assert "checks: 20 of 20 passed" in r.stdout
    assert "Traceback" not in r.stderr and " WARN " not in r.stderr
    # One screen: a line per stage with its elapsed time, then the summary; nothing from Java.
    err = job_lines(r.stderr)
    for stage in ("read input", "build and check", "write songs", "publish"):
        assert any(stage in ln and ln.rstrip().endswith("s)") for ln in err), stage
    assert all(" INFO " in ln for ln in err), r.stderr
    assert len(r.stdout.splitlines()) + len(err) <= 40


def test_cli_missing_input_exits_2_with_one_line(tmp_path):
    r = cli("--input", "/no/such/dir", "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "/no/such/dir" in r.stderr and "does not exist" in r.stderr
    # a file where the input folder should be
    r = cli("--input", os.path.join(ROOT, "etl.py"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().endswith("etl.py is a file, not a folder; pass --input DIR holding song_data/ and "
                                     "log_data/")


def test_cli_input_without_json_files_exits_2(tmp_path):
    for d in ("song_data/A", "log_data/2018"):
        (tmp_path / "in" / d).mkdir(parents=True)
    (tmp_path / "in" / "song_data" / "A" / "notes.txt").write_text("not json")
    r = cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert "no .json files" in r.stderr
    assert "Traceback" not in r.stderr and "at org.apache" not in r.stderr


def test_cli_help_documents_every_flag():
    r = cli("--help")
    assert r.returncode == 0
    for flag in ("--input", "--output", "--config", "--months", "--duration-tolerance", "--dry-run",
                 "--log-level", "--max-bad-fraction", "--force"):
        assert flag in r.stdout, flag


def test_cli_bad_option_values_exit_2(tmp_path):
    for args in (["--months", "2018-13"], ["--max-bad-fraction", "2"], ["--duration-tolerance", "-1"],
                 ["--config", str(tmp_path / "missing.cfg")]):
        r = cli(*args)
        assert r.returncode == 2, args
        assert r.stderr.strip().splitlines()[-1].startswith(("etl.py: error:", "usage:")), args
    # a config file with half of a key pair, for S3 (the credential chain would not be used either)
    half = tmp_path / "half.cfg"
    half.write_text("[AWS]\nAWS_ACCESS_KEY_ID = AKIAEXAMPLE\n")
    r = cli("--config", str(half), "--input", "s3a://bucket/in", "--output", str(tmp_path / "o"),
            **{k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    assert r.returncode == 2
    assert r.stderr.strip() == (f"etl.py: error: config file {half} has AWS_ACCESS_KEY_ID but no "
                                "AWS_SECRET_ACCESS_KEY; set both, or neither to use the AWS credential chain")
    # and a memory size the JVM would refuse, before it starts
    r = cli("--output", str(tmp_path / "o"), SPARKIFY_DRIVER_MEMORY="lots")
    assert r.returncode == 2
    assert r.stderr.strip() == ("etl.py: error: SPARKIFY_DRIVER_MEMORY=lots is not a memory size; set it "
                                "like 4g or 4096m, or unset it")


# ---- the full song catalogue (14,896 files) with the sample logs


@pytest.fixture(scope="module")
def full_input(tmp_path_factory):
    archive = os.path.join(SHARED_DATA, "song_data_full.tar.gz")
    if not os.path.isfile(archive):
        pytest.fail(f"{archive} is missing: the full catalogue test needs ../shared/data")
    root = tmp_path_factory.mktemp("full")
    with tarfile.open(archive) as tar:
        tar.extractall(root)
    found = [d for d in glob.glob(str(root / "**" / "song_data"), recursive=True)]
    assert len(found) == 1, found
    inp = root / "input"
    inp.mkdir()
    os.symlink(found[0], inp / "song_data")
    os.symlink(os.path.join(SAMPLE, "log_data"), inp / "log_data")
    return inp


@pytest.mark.slow
def test_full_catalogue(spark, full_input, tmp_path):
    out = tmp_path / "lake"
    assert run_job(spark, full_input, out) == 0
    t = read_tables(spark, str(out))
    assert t["songs"].count() == 14896
    assert t["artists"].count() == 9553
    assert t["songplays"].count() == 6820
    assert t["songplays"].filter("song_id IS NOT NULL").count() == 319
    dirs = glob.glob(str(out / "songs" / "year=*" / "artist_id=*"))
    files = glob.glob(str(out / "songs" / "year=*" / "artist_id=*" / "*.parquet"))
    assert len(files) == len(dirs) > 9000
    # The analytics team's top songs on the full catalogue: real titles, play counts as the
    # match rule decides them (each count checked against songplays directly).
    top = analytics.run_queries(spark, str(out), ["top_songs"])["top_songs"][1]
    assert top[0][:3] == ("You're The One", "Dwight Yoakam", 37)
    assert len(top) == 10 and all(title and artist and plays >= 1 for title, artist, plays, _ in top)
    by_song = {r["title"]: r["n"] for r in t["songplays"].join(t["songs"], "song_id")
               .groupBy("title").agg(F.count("*").alias("n")).collect()}
    assert [plays for _, _, plays, _ in top] == sorted(by_song.values(), reverse=True)[:10]
    assert all(by_song[title] == plays for title, _, plays, _ in top)


# ---- the JVM's class archive: written by the first run, mapped by the next ones


@pytest.mark.slow
def test_class_archive_written_once_then_mapped_and_a_damaged_one_is_replaced(tmp_path):
    env = {"SPARKIFY_JARS_DIR": str(tmp_path / "cache" / "jars")}
    # A dry run and a failed run load only part of the job's classes: neither writes the archive,
    # which would then serve every later run.
    empty = tmp_path / "empty"
    for name in ("song_data", "log_data"):
        (empty / name).mkdir(parents=True)
    for args, code in ((["--dry-run"], 0), (["--input", str(empty)], 2)):
        r = cli(*args, "--output", str(tmp_path / "o0"), **env)
        assert r.returncode == code, r.stderr
        assert "saving the JVM's classes" not in r.stderr
        assert not glob.glob(str(tmp_path / "cache" / "jvm-classes-*")), os.listdir(tmp_path / "cache")
    first = cli("--output", str(tmp_path / "o1"), **env)
    assert first.returncode == 0, first.stderr
    assert "saving the JVM's classes" in first.stderr
    archives = glob.glob(str(tmp_path / "cache" / "jvm-classes-*.jsa"))
    assert len(archives) == 1, os.listdir(tmp_path / "cache")
    archive = archives[0]
    with open(archive + ".size") as f:
        assert int(f.read()) == os.path.getsize(archive) > 10_000_000
    assert not glob.glob(archive + ".*.tmp")
    # The next run's JVM loads Spark's classes from the archive: its class-loading log says so.
    classes = tmp_path / "classes.log"
    second = cli("--output", str(tmp_path / "o2"), JAVA_TOOL_OPTIONS=f"-Xlog:class+load=info:file={classes}",
                 **env)
    assert second.returncode == 0, second.stderr
    assert "saving the JVM's classes" not in second.stderr
    loaded = classes.read_text()
    assert "org.apache.spark.sql.SparkSession source: shared objects file (top)" in loaded
    assert "org.apache.spark.sql.execution.datasources.parquet.ParquetFileFormat source: shared objects " \
           "file (top)" in loaded
    # A JVM that does not start with the archive or without it (an option Java does not know):
    # the run fails in one line, and the archive, which was not the cause, stays.
    bad = cli("--output", str(tmp_path / "o2b"), JAVA_TOOL_OPTIONS="-XX:+NoSuchSparkifyOption", **env)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("etl.py: error:") == 1, bad.stderr
    assert os.path.exists(archive) and os.path.exists(archive + ".size")
    # A cut-off archive whose recorded size matches (the JVM crashes on it at start): the run
    # starts without it, succeeds, and drops it.
    with open(archive, "r+b") as f:
        f.truncate(os.path.getsize(archive) // 2)
    with open(archive + ".size", "w") as f:
        f.write(str(os.path.getsize(archive)))
    third = cli("--output", str(tmp_path / "o3"), cwd=tmp_path, **env)
    assert third.returncode == 0, third.stderr
    assert "did not start with its class archive" in third.stderr
    assert not os.path.exists(archive)
    assert not glob.glob(str(tmp_path / "hs_err*")), "the crash left a JVM error file in the working folder"


def test_ending_the_jvm_while_py4j_releases_objects_prints_no_traceback(tmp_path):
    """py4j's finalizer thread sends the JVM a message for every Python-side reference released.
    A first dry run (or failed run) ends the JVM it set to write the class archive; a message on
    its way then made py4j print a traceback after a run that had succeeded.  Here the thread is
    kept busy (200,000 releases queued), and six more threads call the JVM without a pause, so
    that requests are on their way when stop_spark ends the JVM."""
    code = (
        f"import sys, threading, time; sys.path.insert(0, {ROOT!r})\n"
        "import etl\n"
        f"cfg = etl.load_config(['--dry-run', '--output', {str(tmp_path / 'o')!r}])\n"
        "spark = etl.build_spark(cfg)\n"
        "assert spark._sparkify_archive[1], 'the JVM is not set to write a class archive'\n"
        "from pyspark import SparkContext\n"
        "client = SparkContext._gateway._gateway_client\n"
        "for i in range(200_000):\n"
        "    client.finalizer_deque.appendleft((client, f'none{i}'))  # no such object\n"
        "def busy(jvm=spark._jvm):\n"
        "    try:\n"
        "        while True:\n"
        "            jvm.java.lang.System.nanoTime()\n"
        "    except Exception:\n"
        "        pass\n"
        "for _ in range(6):\n"
        "    threading.Thread(target=busy, daemon=True).start()\n"
        "time.sleep(1.5)  # the finalizer thread polls its queue every second\n"
        "assert len(client.finalizer_deque) > 1000, 'the releases were all sent already'\n"
        "etl.stop_spark(spark, keep_archive=False)\n"
        "time.sleep(1)\n"
        "print('stopped')\n")
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARKIFY_JARS_DIR=str(tmp_path / "cache" / "jars"))  # no archive yet: one is written
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("stopped")
    assert "Traceback" not in r.stderr and "Exception while sending command" not in r.stderr, r.stderr


def test_job_log_drops_only_the_duplicate_block_warning(tmp_path):
    """Concurrent queries may compute one persisted partition twice; Spark's warning about the
    dropped copy is filtered out of the job's log, its other warnings are not."""
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r})\n"
        "import etl\n"
        f"cfg = etl.load_config(['--output', {str(tmp_path / 'o')!r}])\n"
        "spark = etl.build_spark(cfg)\n"
        "logger = spark._jvm.org.apache.logging.log4j.LogManager.getLogger("
        "'org.apache.spark.storage.BlockManager')\n"
        "logger.warn('Block rdd_162_0 already exists on this machine; not re-adding it')\n"
        "logger.warn('Putting block rdd_7_0 failed')\n"
        "etl.stop_spark(spark, keep_archive=False)\n")
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert "Putting block rdd_7_0 failed" in r.stderr
    assert "already exists on this machine" not in r.stderr
