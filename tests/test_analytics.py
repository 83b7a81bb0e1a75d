"""analytics.py on the lake built from the sample: every standard query against figures computed
here from the raw JSON in plain Python (no Spark), the CLI, the charts and the errors."""
from __future__ import annotations

import collections
import datetime as dt
import glob
import io
import json
import os
import struct

import pytest
from conftest import SAMPLE, job_lines

import analytics


def _utc(ts_ms: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=ts_ms)


@pytest.fixture(scope="module")
def raw():
    """The sample's logged-in events and its distinct plays, straight from the JSON files."""
    events = []
    for path in sorted(glob.glob(os.path.join(SAMPLE, "log_data", "**", "*.json"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            events += [json.loads(line) for line in f if line.strip()]
    events = [e for e in events if str(e.get("userId") or "").isdigit()]
    plays = {}
    for e in events:
        if e["page"] == "NextSong":
            plays[(int(e["userId"]), e["sessionId"], e["itemInSession"], e["ts"])] = e
    return events, list(plays.values())


@pytest.fixture(scope="module")
def results(sample_answers):
    return {name: [dict(zip(cols, row)) for row in rows] for name, (cols, rows) in sample_answers.items()}


def test_every_standard_query_runs(results):
    assert list(results) == list(analytics.load_queries())
    assert set(analytics.STANDARD) <= set(results)


def test_plays_by_level(results, raw):
    got = {r["level"]: r["plays"] for r in results["plays_by_level"]}
    assert got == {"paid": 5591, "free": 1229}  # the figures the analytics team expects
    assert got == dict(collections.Counter(e["level"] for e in raw[1]))
    listeners = {lvl: len({e["userId"] for e in raw[1] if e["level"] == lvl}) for lvl in got}
    assert {r["level"]: r["listeners"] for r in results["plays_by_level"]} == listeners
    assert sum(float(r["pct"]) for r in results["plays_by_level"]) == pytest.approx(100, abs=0.2)


def test_plays_by_hour(results, raw):
    rows = results["plays_by_hour"]
    assert [r["hour"] for r in rows] == list(range(24))
    expected = collections.Counter(_utc(e["ts"]).hour for e in raw[1])
    assert {r["hour"]: r["plays"] for r in rows} == {h: expected.get(h, 0) for h in range(24)}
    busiest = max(rows, key=lambda r: r["plays"])
    assert (busiest["hour"], busiest["plays"]) == (16, 542)


def test_plays_by_weekday(results, raw):
    rows = results["plays_by_weekday"]
    expected = collections.Counter(_utc(e["ts"]).isoweekday() for e in raw[1])
    assert {r["weekday"]: r["plays"] for r in rows} == {d: expected.get(d, 0) for d in range(1, 8)}
    assert [r["day"] for r in rows] == ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def test_top_users(results, raw):
    plays = collections.Counter(int(e["userId"]) for e in raw[1])
    expected = sorted(plays.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    rows = results["top_users"]
    assert [(r["user_id"], r["plays"]) for r in rows] == expected
    latest = {}
    for e in sorted(raw[0], key=lambda e: e["ts"]):
        latest[int(e["userId"])] = e
    for r in rows:
        e = latest[r["user_id"]]
        assert (r["first_name"], r["last_name"], r["level"]) == (e["firstName"], e["lastName"], e["level"])
        assert r["sessions"] == len({p["sessionId"] for p in raw[1] if int(p["userId"]) == r["user_id"]})


def test_users_by_level(results, raw):
    latest = {}
    for e in sorted(raw[0], key=lambda e: e["ts"]):
        latest[int(e["userId"])] = e["level"]
    assert {r["level"]: r["users"] for r in results["users_by_level"]} == dict(
        collections.Counter(latest.values()))


def test_songs_and_match_share(results, raw):
    # The sample's only play of a song in its song_data: "Setanta matins" by Elena.
    assert [(r["title"], r["artist"], r["plays"]) for r in results["top_songs"]] == [
        ("Setanta matins", "Elena", 1)]
    assert [(r["artist"], r["plays"]) for r in results["top_artists"]] == [("Elena", 1)]
    share = results["matched_share"][0]
    assert (share["plays"], share["matched"]) == (len(raw[1]), 1)


def test_new_users_and_daily_plays(results, raw):
    first = {}
    for e in raw[1]:
        uid = int(e["userId"])
        first[uid] = min(first.get(uid, e["ts"]), e["ts"])
    expected = collections.Counter(_utc(ts).date() for ts in first.values())
    assert {r["day"]: r["new_users"] for r in results["new_users_per_day"]} == dict(expected)
    daily = collections.defaultdict(collections.Counter)
    for e in raw[1]:
        daily[_utc(e["ts"]).date()][e["level"]] += 1
    assert {r["day"]: (r["free"], r["paid"]) for r in results["plays_per_day_by_level"]} == {
        d: (c["free"], c["paid"]) for d, c in daily.items()}


def test_ad_hoc_sql_and_one_query(spark, sample_lake):
    out = io.StringIO()
    sql = "SELECT level, COUNT(*) AS n FROM songplays GROUP BY level ORDER BY level"
    assert analytics.main(["--lake", sample_lake, "--sql", sql], spark=spark, out=out) == 0
    lines = out.getvalue().splitlines()
    assert ["free", "1,229"] in [ln.split() for ln in lines] and ["paid", "5,591"] in [ln.split() for ln in lines]
    out = io.StringIO()
    assert analytics.main(["--lake", sample_lake, "--query", "matched_share"], spark=spark, out=out) == 0
    assert "Plays matched to a known song" in out.getvalue() and "Most played" not in out.getvalue()


def test_limit_truncates_and_says_so(spark, sample_lake):
    out = io.StringIO()
    assert analytics.main(["--lake", sample_lake, "--query", "plays_by_hour", "--limit", "5"],
                          spark=spark, out=out) == 0
    text = out.getvalue()
    assert "first 5 rows" in text
    assert [ln.split()[0] for ln in text.splitlines() if ln.split() and ln.split()[0].isdigit()] == [
        "0", "1", "2", "3", "4"]


def test_errors_exit_2_with_one_line(spark, sample_lake, tmp_path, capsys):
    cases = [
        (["--lake", sample_lake, "--sql", "SELECT nope FROM songplays"], "query failed"),
        (["--lake", sample_lake, "--sql", "SELECT * FROM no_such_table"], "query failed"),
        (["--lake", str(tmp_path / "missing")], "does not exist"),
        (["--lake", str(tmp_path)], "not a Sparkify lake"),
        (["--lake", sample_lake, "--query", "no_such_query"], "no standard query named no_such_query"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert analytics.main(argv, spark=spark) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, (argv, err)


def _png_size(path: str) -> tuple:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def test_cli_prints_every_query_and_writes_charts(analytics_cli):
    r, charts = analytics_cli
    assert r.returncode == 0, r.stderr
    for q in analytics.load_queries().values():
        assert f"== {q.title}" in r.stdout, q.name
    assert "5,591" in r.stdout and "1,229" in r.stdout
    assert job_lines(r.stderr) == [], r.stderr  # no Spark or Java log line
    # the sample matches one play to a known song: a top-songs chart of one bar says nothing
    drawn = sorted(set(analytics.CHARTS) - {"top_songs.png"})
    assert sorted(os.listdir(charts)) == drawn
    assert "chart top_songs.png not drawn: only 1 song(s) with a matched play; the chart needs 3" in r.stdout
    for name in drawn:
        path = str(charts / name)
        width, height = _png_size(path)
        assert width >= 800 and height >= 400, (name, width, height)
        assert os.path.getsize(path) > 8_000, name  # axes, labels and bars, not an empty canvas
