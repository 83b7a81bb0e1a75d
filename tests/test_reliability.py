"""Reliability: nothing lost, nothing half-written, safe to rerun, one writer at a time."""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
from conftest import SAMPLE, manifest_rows, read_tables, run_job, table_rows

import etl



def snapshot(out):
    """Every file under out with its size, mtime and (for the manifest) content."""
    snap = {}
    for d, _, files in os.walk(out):
        for f in files:
            p = os.path.join(d, f)
            snap[os.path.relpath(p, out)] = (os.path.getsize(p), os.path.getmtime(p))
    with open(os.path.join(out, "_manifest.json")) as f:
        snap["manifest"] = f.read()
    return snap


def copy_input(tmp_path, name="in"):
    inp = tmp_path / name
    shutil.copytree(SAMPLE, inp, ignore=shutil.ignore_patterns("SOURCE.txt"))
    return inp


def main(spark, *args):
    return etl.main(list(map(str, args)), spark=spark)


@pytest.fixture(scope="module")
def good_lake(spark, tmp_path_factory):
    """A lake from a successful run, copied fresh for each test that needs a previous output."""
    out = tmp_path_factory.mktemp("good") / "lake"
    assert run_job(spark, SAMPLE, out) == 0
    return out


@pytest.fixture
def previous(good_lake, tmp_path):
    out = tmp_path / "lake"
    shutil.copytree(good_lake, out)
    return out


# ---- bad input


def test_malformed_lines_are_rejected_with_their_raw_text_and_good_rows_load(spark, tmp_path):
    inp = copy_input(tmp_path)
    log_file = inp / "log_data" / "2018" / "11" / "2018-11-12-events.json"
    lines = log_file.read_text().splitlines()
    play = json.loads(next(ln for ln in lines if '"NextSong"' in ln))
    play.update(itemInSession=999, ts="not-a-number")
    truncated = '{"artist":"Pavement","auth":"Logged In","firstName":"Sylvie","gender":"F","itemInSe'
    wrong_type = json.dumps(play)
    log_file.write_text("\n".join([*lines, truncated, wrong_type]) + "\n")
    broken_song = '{"num_songs": 1, "artist_id": "ARBROKEN", "song_id": "SOBROKEN", "title": "Half'
    (inp / "song_data" / "A" / "A" / "A" / "TRBROKEN.json").write_text(broken_song)
    out = tmp_path / "lake"

    assert main(spark, "--input", inp, "--output", out) == 0

    rejects = [json.loads(ln) for f in sorted((out / "_rejects").glob("*.json"))
               for ln in f.read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == sorted([truncated, wrong_type, broken_song])
    files = {os.path.basename(r["file"]) for r in rejects}
    assert files == {"2018-11-12-events.json", "TRBROKEN.json"}
    counts = {t: df.count() for t, df in read_tables(spark, out).items()}
    assert counts == {"songplays": 6820, "users": 97, "songs": 71, "artists": 69, "time": 6813}
    with open(out / "_manifest.json") as f:
        manifest = json.load(f)
    assert manifest["rejects"]["log_data"]["rejected"] == 2
    assert manifest["rejects"]["song_data"]["rejected"] == 1
    assert manifest["rejects"]["log_data"]["records"] == 8058
    # no row of nulls got in
    assert read_tables(spark, out)["songs"].filter("song_id IS NULL OR title IS NULL").count() == 0


def test_too_many_bad_records_exit_1_and_write_nothing(spark, tmp_path, capsys):
    inp = copy_input(tmp_path)
    log_file = inp / "log_data" / "2018" / "11" / "2018-11-12-events.json"
    with open(log_file, "a") as f:
        f.writelines(f"garbage line {i}\n" for i in range(200))
    out = tmp_path / "lake"
    assert main(spark, "--input", inp, "--output", out) == 1
    err = capsys.readouterr().err
    assert "200 of 8,326 input lines are rejected" in err and "--max-bad-fraction" in err
    assert not any((out / t).exists() for t in etl.TABLES)
    assert not (out / "_manifest.json").exists()
    # the same input passes with a looser threshold
    assert main(spark, "--input", inp, "--output", out, "--max-bad-fraction", "0.05") == 0


# ---- quality gate


def test_failed_quality_check_exits_1_names_it_and_keeps_previous_output(spark, previous, monkeypatch, capsys):
    before = snapshot(previous)
    real = etl.songs_table

    def with_duplicate(records):
        df = real(records)
        return df.unionByName(df.orderBy("song_id").limit(1))

    monkeypatch.setattr(etl, "songs_table", with_duplicate)
    assert main(spark, "--input", SAMPLE, "--output", previous) == 1
    err = capsys.readouterr().err
    assert "songs.song_id unique" in err and "duplicated key SO" in err
    assert snapshot(previous) == before
    # the tables were staged while the checks ran: the staging is gone, the lock released
    assert not (previous / "_staging").exists() and not (previous / "_lock.json").exists()


# ---- idempotence and crash safety


def test_failure_while_writing_leaves_previous_output_unchanged(spark, previous, monkeypatch):
    before = snapshot(previous)
    real, calls = etl.write_table, []

    def failing(df, path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk full (injected)")
        return real(df, path, *a, **kw)

    monkeypatch.setattr(etl, "write_table", failing)
    assert main(spark, "--input", SAMPLE, "--output", previous) == 2
    assert len(calls) == 6  # the writes run concurrently: all are tried (no rejects: no _rejects write)
    assert snapshot(previous) == before
    assert not (previous / "_staging").exists() and not (previous / "_lock.json").exists()
    assert {t: df.count() for t, df in read_tables(spark, previous).items()}["songplays"] == 6820


def interrupt_publish(spark, out, monkeypatch, after_manifest):
    """Run the job with its publish killed (the process dies there): halfway through moving the
    new files into place, or once the manifest is written, before the replaced files are deleted."""
    real_put, real_delete = etl.LocalStore.put, etl.LocalStore.delete

    def put_half(self, staged, keys):
        keys = list(keys)
        real_put(self, staged, keys[: len(keys) // 2])
        raise OSError("killed (injected)")

    def delete_after_manifest(self, keys):
        keys = list(keys)
        if keys != [etl.LOCK]:
            raise OSError("killed (injected)")
        real_delete(self, keys)

    if after_manifest:
        monkeypatch.setattr(etl.LocalStore, "delete", delete_after_manifest)
    else:
        monkeypatch.setattr(etl.LocalStore, "put", put_half)
    assert main(spark, "--input", SAMPLE, "--output", out) == 2
    monkeypatch.undo()
    with open(out / etl.JOURNAL) as f:
        return json.load(f)["run_id"]


def published_files(out):
    return sorted(os.path.relpath(os.path.join(d, f), out) for t in etl.TABLES for d, _, fs in os.walk(out / t)
                  for f in fs if f.endswith(".parquet"))


@pytest.mark.parametrize("after_manifest", [False, True])
def test_interrupted_publish_is_rolled_back_or_completed_by_the_next_run(spark, previous, monkeypatch,
                                                                       after_manifest):
    before = snapshot(previous)
    interrupted = interrupt_publish(spark, previous, monkeypatch, after_manifest)
    assert len(published_files(previous)) > len([k for k in before if k.endswith(".parquet")])
    etl.recover(etl.LocalStore(str(previous)))
    with open(previous / "_manifest.json") as f:
        manifest = json.load(f)
    listed = sorted(os.path.join(t, f) for t in etl.TABLES for f in manifest["tables"][t]["files"])
    assert listed == published_files(previous)
    if after_manifest:  # completed: the interrupted run's tables
        assert manifest["run_id"] == interrupted
    else:  # rolled back: the previous output exactly
        assert snapshot(previous) == before
    assert not (previous / etl.JOURNAL).exists()
    counts = {t: df.count() for t, df in read_tables(spark, previous).items()}
    assert counts == {"songplays": 6820, "users": 97, "songs": 71, "artists": 69, "time": 6813}
    # and the next run starts clean: no staging left, its own tables published
    assert main(spark, "--input", SAMPLE, "--output", previous) == 0
    for leftover in ("_staging", etl.JOURNAL, etl.LOCK):
        assert not (previous / leftover).exists(), leftover


def test_two_runs_on_the_same_input_give_identical_tables(spark, good_lake, tmp_path):
    out = tmp_path / "again"
    spark.conf.set("spark.sql.shuffle.partitions", "5")
    assert run_job(spark, SAMPLE, out) == 0
    assert table_rows(spark, out) == table_rows(spark, good_lake)
    # and rerunning onto the same output replaces it with the same tables
    assert run_job(spark, SAMPLE, out) == 0
    assert table_rows(spark, out) == table_rows(spark, good_lake)


# ---- incremental runs


def test_month_by_month_equals_one_full_run(spark, two_months, two_months_lake, tmp_path, capsys):
    full, inc = two_months_lake, tmp_path / "inc"
    assert run_job(spark, two_months, inc, "--months", "2018-11") == 0
    after_nov = read_tables(spark, inc)
    assert after_nov["songplays"].filter("month = 12").count() == 0
    nov_rows = manifest_rows(inc)
    capsys.readouterr()
    assert run_job(spark, two_months, inc, "--months", "2018-12") == 0
    summary = capsys.readouterr().out
    expected = table_rows(spark, full)
    assert sorted({r[-1] for r in expected["time"]}) == [2018]
    assert table_rows(spark, inc) == expected
    assert len(expected["songplays"]) == 6820
    # the manifest counts the tables as published, November's rows kept by December's run too
    assert manifest_rows(inc) == manifest_rows(full) == {name: len(rows) for name, rows in expected.items()}
    assert 0 < nov_rows["songplays"] < 6820
    assert re.search(r"^\s+songplays\s+6,820\s", summary, re.M), summary  # and so does the summary
    # rerunning December replaces December's partitions and leaves November's files alone
    nov, dec = inc / "songplays" / "year=2018" / "month=11", inc / "songplays" / "year=2018" / "month=12"
    nov_files, dec_files = sorted(os.listdir(nov)), sorted(os.listdir(dec))
    assert run_job(spark, two_months, inc, "--months", "2018-12") == 0
    assert sorted(os.listdir(nov)) == nov_files and sorted(os.listdir(dec)) != dec_files
    assert table_rows(spark, inc) == expected



def rejects_of(out):
    return sorted(tuple(json.loads(ln)[k] for k in ("input", "file", "reason", "line"))
                  for f in (out / "_rejects").glob("*.json") for ln in f.read_text().splitlines())


def test_month_by_month_keeps_every_months_rejects(spark, two_months, tmp_path):
    """An incremental run replaces the rejects of the files it read, not those of other months."""
    inp = tmp_path / "in"
    shutil.copytree(two_months, inp)
    nov = inp / "log_data" / "2018" / "11" / "2018-11-01-events.json"
    nov.write_text(nov.read_text() + '{"artist": "Pavement", "auth": "Logg\n')
    # February 2019: December's first file 62 days later, and a line of the wrong type.
    dec = (inp / "log_data" / "2018" / "12" / "2018-12-16-events.json").read_text().splitlines()
    events = [json.loads(ln) for ln in dec]
    for e in events:
        e["ts"] += 62 * 86_400_000
    feb = inp / "log_data" / "2019" / "02"
    feb.mkdir(parents=True)
    (feb / "2019-02-16-events.json").write_text(
        "".join(json.dumps(e) + "\n" for e in events) + '{"ts": "yesterday", "page": "NextSong"}\n')
    inc = tmp_path / "inc"
    expected = [("log_data", str(nov), "malformed JSON or wrong type", '{"artist": "Pavement", "auth": "Logg'),
                ("log_data", str(feb / "2019-02-16-events.json"), "malformed JSON or wrong type",
                 '{"ts": "yesterday", "page": "NextSong"}')]
    for month in ("2018-11", "2018-12", "2019-02"):
        assert run_job(spark, inp, inc, "--months", month) == 0
    # February's run read no November file: November's reject is still there
    assert rejects_of(inc) == expected
    # and rerunning a month replaces its rejects instead of adding them again
    assert run_job(spark, inp, inc, "--months", "2019-02") == 0
    assert rejects_of(inc) == expected


def test_a_month_without_events_is_a_usage_error_and_writes_nothing(spark, two_months, tmp_path, capsys):
    out = tmp_path / "lake"
    assert main(spark, "--input", two_months, "--output", out, "--months", "2019-05") == 2
    err = capsys.readouterr().err
    assert f"no log_data events in 2019-05 under {two_months}; check --months" in err
    assert not out.exists() or not any(p.name != "_lock.json" for p in out.iterdir())


# ---- one writer at a time


def test_an_output_that_cannot_be_written_is_named_as_such_not_as_locked(spark, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "lake"
    assert main(spark, "--input", SAMPLE, "--output", out) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"etl.py: error: cannot write to {out}: Not a directory; pass an --output you can write to"


def test_stale_lock_is_taken_over_with_force_or_when_its_process_is_gone(spark, tmp_path, capsys):
    out = tmp_path / "lake"
    out.mkdir()
    lock = out / "_lock.json"
    live = {"run_id": "other", "host": "elsewhere", "pid": 1, "since": "2026-01-01T00:00:00Z",
            "since_epoch": time.time()}
    lock.write_text(json.dumps(live))
    assert main(spark, "--input", SAMPLE, "--output", out, "--dry-run") == 0  # a dry run takes no lock
    assert main(spark, "--input", SAMPLE, "--output", out) == 2
    assert "host elsewhere" in capsys.readouterr().err
    assert main(spark, "--input", SAMPLE, "--output", out, "--force") == 0
    assert not lock.exists()
    # a lock whose process is gone from this host, or older than the timeout, is taken over too
    cfg = etl.load_config(["--output", str(out)], environ={})
    for stale in (dict(live, host=etl.socket.gethostname(), pid=2 ** 22 + 12345),
                  dict(live, since_epoch=time.time() - 7 * 3600)):
        lock.write_text(json.dumps(stale))
        etl.take_lock(etl.LocalStore(str(out)), cfg, "next")
        assert json.loads(lock.read_text())["run_id"] == "next"
        lock.unlink()
