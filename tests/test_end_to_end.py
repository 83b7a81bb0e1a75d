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
from conftest import ROOT, SAMPLE, job_lines, read_tables, run_job

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
    for path in sorted(glob.glob(os.path.join(sample_lake, "songs", "year=*", "artist_id=*", "*.parquet")))[:5]:
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


def test_local_file_system_sets_ordinary_permissions_and_writes_no_checksum_files(sample_lake):
    import stat

    part = glob.glob(os.path.join(sample_lake, "songs", "year=*", "artist_id=*", "*.parquet"))[0]
    # Hadoop's default umask (fs.permissions.umask-mode) is 022
    assert stat.S_IMODE(os.stat(part).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.dirname(part)).st_mode) == 0o755
    # FastLocalFileSystem (built where javac exists, as here) writes no .crc file beside each file
    assert etl.local_fs_classes(), "javac is on this machine, so FastLocalFileSystem.java must build"
    assert [f for _, _, fs in os.walk(sample_lake) for f in fs if f.endswith(".crc")] == []


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


def test_cli_runs_print_a_summary_no_warning_and_leave_the_temporary_folder_as_they_found_it(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = cli(cwd=tmp_path, TMPDIR=str(tmp))
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
    # One screen: a line per stage with its elapsed time, then the summary; nothing from Java.
    err = job_lines(r.stderr)
    for stage in ("read input", "build and check", "write songs", "publish"):
        assert any(stage in ln and ln.rstrip().endswith("s)") for ln in err), stage
    assert all(" INFO " in ln for ln in err), r.stderr
    assert len(r.stdout.splitlines()) + len(err) <= 40
    assert os.listdir(tmp) == []
    # an incremental run on that output, which reads its users state back, is as quiet and as clean
    r = cli("--output", str(out), "--months", "2018-11", cwd=tmp_path, TMPDIR=str(tmp))
    assert r.returncode == 0, r.stderr
    assert [ln for ln in job_lines(r.stderr) if " INFO " not in ln] == [], r.stderr
    assert os.listdir(tmp) == []


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


def test_input_without_json_files_exits_2_with_one_line(spark, tmp_path, capsys):
    for d in ("song_data/A", "log_data/2018"):
        (tmp_path / "in" / d).mkdir(parents=True)
    (tmp_path / "in" / "song_data" / "A" / "notes.txt").write_text("not json")
    assert etl.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")], spark=spark) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"etl.py: error: no .json files under {tmp_path / 'in'}/song_data; check --input"


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
    archive = os.path.join(SAMPLE, "song_data_full.tar.gz")
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


def test_a_line_holding_an_event_and_more_text_is_rejected_whole_and_the_summary_adds_up(spark, tmp_path, capsys):
    inp = tmp_path / "in"
    shutil.copytree(os.path.join(SAMPLE, "song_data"), inp / "song_data")
    shutil.copytree(os.path.join(SAMPLE, "log_data"), inp / "log_data")
    day = inp / "log_data" / "2018" / "11" / "2018-11-01-events.json"
    text = day.read_text()
    assert not text.endswith("\n")  # as every sample log file: the appended text joins the last event
    last = text.splitlines()[-1]
    day.write_text(text + '{"artist": "Broken", "song": "Half')
    assert run_job(spark, inp, tmp_path / "lake") == 0
    summary = capsys.readouterr().out
    assert "rejected log_data: 1 of 8,056 lines" in summary
    assert "songplays         6,819" in summary or "songplays         6,820" in summary
    rejects = [json.loads(ln) for f in (tmp_path / "lake" / "_rejects").glob("*.json")
               for ln in f.read_text().splitlines()]
    assert rejects == [{"input": "log_data", "file": str(day), "reason": "more than one JSON value on the line",
                        "line": last + '{"artist": "Broken", "song": "Half'}]


@pytest.mark.slow
def test_spark_submit_with_a_local_master_runs_the_job_as_python_does(spark, tmp_path, sample_lake):
    from conftest import table_rows

    submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    out = tmp_path / "lake"
    r = subprocess.run([submit, "--master", "local[2]", os.path.join(ROOT, "etl.py"), "--output", str(out)],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checks: 20 of 20 passed" in r.stdout
    assert table_rows(spark, out) == table_rows(spark, sample_lake)
