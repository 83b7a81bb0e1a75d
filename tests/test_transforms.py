"""Unit tests of the table rules on small inline DataFrames."""
from __future__ import annotations

import datetime as dt

from conftest import event, song

import etl

UTC = dt.timezone.utc


def ms(*args) -> int:
    return int(dt.datetime(*args, tzinfo=UTC).timestamp() * 1000)


def build_songplays(events, songs, tolerance=0.0):
    good = etl.events_with_user(events)
    return etl.songplays_table(etl.plays(good), etl.song_records(songs), tolerance)


def rows(df, *cols):
    return sorted(tuple(r) for r in df.select(*cols).collect())


# ---- users


def test_user_attributes_come_from_latest_event_even_when_it_is_not_a_play(events_df):
    ev = events_df(
        event(userId="7", ts=1000, level="free", lastName="Old", page="NextSong"),
        event(userId="7", ts=3000, level="paid", lastName="New", page="Home", song=None),
        event(userId="7", ts=2000, level="free", lastName="Mid", page="NextSong", itemInSession=1),
    )
    users = etl.users_table(etl.events_with_user(ev))
    assert rows(users, "user_id", "last_name", "level") == [(7, "New", "paid")]


def test_users_include_non_players_and_exclude_logged_out_events(events_df):
    ev = events_df(
        event(userId="3", page="Home", song=None),
        event(userId="", page="Home", firstName=None, song=None),
        event(userId="  ", page="NextSong"),
        event(userId="4"),
    )
    users = etl.users_table(etl.events_with_user(ev))
    assert rows(users, "user_id") == [(3,), (4,)]


def test_incremental_users_merge_keeps_the_latest_event(events_df):
    old = etl.users_state(etl.events_with_user(events_df(
        event(userId="1", ts=5000, level="paid"), event(userId="2", ts=100, level="free"))))
    new = etl.events_with_user(events_df(
        event(userId="1", ts=4000, level="free"), event(userId="2", ts=200, level="paid")))
    users = etl.users_table(new, previous_state=old)
    assert rows(users, "user_id", "level") == [(1, "paid"), (2, "paid")]


# ---- songplays and the song match


def test_event_delivered_twice_is_counted_once(events_df, songs_df):
    e = event(userId="1", sessionId=5, itemInSession=2, ts=10_000)
    sp = build_songplays(events_df(e, e, event(userId="1", sessionId=5, itemInSession=3, ts=10_001)),
                         songs_df(song()))
    assert sp.count() == 2
    assert sp.select("songplay_id").distinct().count() == 2


def test_non_nextsong_and_logged_out_events_are_not_plays(events_df, songs_df):
    sp = build_songplays(events_df(event(page="Home"), event(userId=""), event(userId="1")),
                         songs_df(song()))
    assert sp.count() == 1


def test_songs_tying_on_title_artist_duration_pick_smallest_song_id(events_df, songs_df):
    songs = songs_df(song(song_id="SOB", artist_id="ARB"), song(song_id="SOA", artist_id="ARA"),
                     song(song_id="SOC", artist_id="ARC"))
    sp = build_songplays(events_df(event()), songs)
    assert rows(sp, "song_id", "artist_id") == [("SOA", "ARA")]


def test_match_requires_equal_duration_unless_tolerance_widens_it(events_df, songs_df):
    ev = events_df(event(length=200.0))
    songs = songs_df(song(song_id="SO_FAR", duration=200.9), song(song_id="SO_NEAR", duration=200.4))
    exact = build_songplays(ev, songs)
    assert rows(exact, "song_id", "artist_id") == [(None, None)]
    widened = build_songplays(ev, songs, tolerance=1.0)
    assert rows(widened, "song_id") == [("SO_NEAR",)]  # closest duration wins
    narrow = build_songplays(ev, songs, tolerance=0.5)
    assert rows(narrow, "song_id") == [("SO_NEAR",)]


def test_match_needs_title_and_artist(events_df, songs_df):
    ev = events_df(event(song="Song", artist="Other"), event(song="Other", itemInSession=1))
    sp = build_songplays(ev, songs_df(song()))
    assert rows(sp, "song_id") == [(None,), (None,)]


def test_many_candidates_never_multiply_plays(events_df, songs_df):
    songs = songs_df(*[song(song_id=f"SO{i}", artist_id=f"AR{i}") for i in range(5)],
                     song(song_id="SO1", artist_id="AR1"))  # and a repeated song record
    ev = events_df(*[event(itemInSession=i) for i in range(3)])
    sp = build_songplays(ev, songs)
    assert sp.count() == 3
    assert rows(sp, "song_id") == [("SO0",)] * 3


def test_songplay_id_is_stable_across_shuffle_partitioning(spark):
    x = etl.extract(spark, etl.DEFAULT_INPUT, etl.DEFAULT_INPUT, [])
    good_logs, good_songs = x.logs, x.songs

    def ids(partitions):
        spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
        sp = build_songplays(good_logs.repartition(partitions), good_songs)
        return sorted(tuple(r) for r in sp.selectExpr(
            "user_id", "session_id", "unix_millis(start_time)", "songplay_id").collect())

    one, seven = ids(1), ids(7)
    assert len(one) == 6820
    assert one == seven


def test_songplay_id_depends_on_every_identity_field(events_df, songs_df):
    base = dict(userId="1", sessionId=1, itemInSession=1, ts=1000)
    variants = [base] + [dict(base, **{k: v}) for k, v in
                         (("userId", "2"), ("sessionId", 2), ("itemInSession", 2), ("ts", 1001))]
    sp = build_songplays(events_df(*[event(**v) for v in variants]), songs_df(song()))
    assert sp.select("songplay_id").distinct().count() == 5
    assert sp.filter("songplay_id < 0").count() == 0


# ---- time


def test_time_fields_are_utc_iso_under_a_non_utc_time_zone(spark, events_df, songs_df):
    assert spark.conf.get("spark.sql.session.timeZone") != "UTC"
    jvm_tz = spark._jvm.java.util.TimeZone.getDefault().getID()
    assert jvm_tz != "UTC"
    last_ms = ms(2018, 12, 31, 23, 59, 59) + 999
    sp = build_songplays(events_df(event(ts=last_ms), event(ts=ms(2018, 11, 4, 9, 30), itemInSession=1)),
                         songs_df(song()))
    time_rows = etl.time_table(sp).selectExpr(
        "unix_millis(start_time)", "hour", "day", "week", "month", "year", "weekday").collect()
    assert sorted(tuple(r) for r in time_rows) == [
        (ms(2018, 11, 4, 9, 30), 9, 4, 44, 11, 2018, 7),  # a Sunday
        (last_ms, 23, 31, 1, 12, 2018, 1),  # Monday of ISO week 1 of 2019
    ]
    assert sorted(rows(sp, "year", "month")) == [(2018, 11), (2018, 12)]


def test_time_has_one_row_per_distinct_start_time(events_df, songs_df):
    sp = build_songplays(events_df(event(userId="1", ts=5000), event(userId="2", ts=5000),
                                   event(userId="3", ts=6000)), songs_df(song()))
    assert etl.time_table(sp).count() == 2


# ---- songs and artists


def test_songs_one_row_per_song_id_most_complete_record(songs_df):
    songs = etl.songs_table(etl.song_records(songs_df(
        song(song_id="SO1", title="Zed", duration=None), song(song_id="SO1", title="Zed", duration=10.0),
        song(song_id="SO2", year=0))))
    assert rows(songs, "song_id", "title", "duration", "year") == [
        ("SO1", "Zed", 10.0, 2000), ("SO2", "Song", 200.0, 0)]


def test_artists_one_row_per_artist_most_complete_record(songs_df):
    artists = etl.artists_table(songs_df(
        song(song_id="SO1", artist_id="AR1", artist_name="A", artist_location=""),
        song(song_id="SO2", artist_id="AR1", artist_name="A feat. B", artist_location="Paris",
             artist_latitude=48.8, artist_longitude=2.3),
        song(song_id="SO3", artist_id="AR1", artist_name="A", artist_location="Lyon"),
        song(song_id="SO4", artist_id="AR2", artist_name="B", artist_location="Rome"),
        song(song_id="SO5", artist_id="AR2", artist_name="B2", artist_location="Milan"),
    ))
    assert rows(artists, "artist_id", "name", "location", "latitude") == [
        ("AR1", "A feat. B", "Paris", 48.8), ("AR2", "B", "Rome", None)]


# ---- schemas


def test_every_table_matches_the_declared_schema(spark, events_df, songs_df):
    ev = etl.events_with_user(events_df(event()))
    so = songs_df(song())
    rec = etl.song_records(so)
    sp = etl.songplays_table(etl.plays(ev), rec)
    built = {"songplays": sp, "users": etl.users_table(ev), "songs": etl.songs_table(rec),
             "artists": etl.artists_table(so), "time": etl.time_table(sp)}
    for name, ddl in etl.OUTPUT_SCHEMAS.items():
        got = [(f.name, f.dataType.simpleString()) for f in built[name].schema.fields]
        want = [tuple(col.split()) for col in ddl.split(", ")]
        assert got == want, name


# ---- quality checks (one query for all of them)


def check_tables(spark, **changes):
    """Small consistent tables; changes replace a table's rows."""
    t = dt.datetime(2018, 11, 1, 12, 0, 0)
    rows = {
        "songplays": [(1, t, 7, "free", "S1", "A1", 3, "L", "UA", 2018, 11),
                      (2, t, 7, "free", None, None, 3, "L", "UA", 2018, 11)],
        "users": [(7, "F", "L", "M", "free")],
        "songs": [("S1", "T", "A1", 2000, 1.0)],
        "artists": [("A1", "N", "L", 1.0, 2.0)],
        "time": [(t, 12, 1, 44, 11, 2018, 4)],
    }
    rows.update(changes)
    schemas = etl.OUTPUT_SCHEMAS
    return {name: spark.createDataFrame(rows[name], schemas[name]) for name in etl.TABLES}


def failed_checks(spark, plays=2, **changes):
    tables = check_tables(spark, **changes)
    play_rows = spark.range(plays)
    return {c.name: c.detail for c in etl.run_checks(etl.check_stats(tables, play_rows)) if not c.ok}


def test_quality_checks_pass_on_consistent_tables(spark):
    tables = check_tables(spark)
    checks = etl.run_checks(etl.check_stats(tables, spark.range(2)))
    assert len(checks) == 20 and all(c.ok for c in checks)


def test_each_quality_check_fails_on_its_defect(spark):
    t = dt.datetime(2018, 11, 1, 12, 0, 0)
    late = dt.datetime(2018, 11, 2, 8, 30, 0)
    user = (7, "F", "L", "M", "free")
    assert failed_checks(spark, users=[user, user, (8, "G", "H", "F", "paid")]) == {
        "users.user_id unique": "1 extra rows, e.g. duplicated key 7"}
    assert failed_checks(spark, songs=[("S1", "T", "A1", 2000, 1.0), (None, "T", "A1", 2000, 1.0)]) == {
        "songs.song_id not null": "1 rows have a null key"}
    assert failed_checks(spark, time=[(late, 8, 2, 44, 11, 2018, 5)]) == {
        "songplays.start_time in time": "no time row for 2018-11-01 12:00:00"}
    assert failed_checks(spark, artists=[]) == {
        "artists not empty": "0 rows", "songplays.artist_id in artists": "no artists row for A1"}
    assert failed_checks(spark, plays=3) == {
        "songplays = distinct NextSong events": "2 rows, 3 distinct events"}
    sp = (5, t, 9, "paid", "S1", "A1", 4, "L", "UA", 2018, 11)
    assert failed_checks(spark, songplays=[sp, sp]) == {
        "songplays.songplay_id unique": "1 extra rows, e.g. duplicated key 5",
        "songplays.user_id in users": "no users row for 9"}


# ---- reading: a line is exactly one JSON object


SONG_FILES = {  # name: bytes, each an edge of reading JSON lines
    "ok.json": b'{"song_id":"S1","artist_id":"A1","title":"t1","duration":1.5,"year":2000}\n',
    "several.json": b'{"song_id":"S2","artist_id":"A2"}\r\n\r\n  \t \n'
                    b'{"song_id":"S3","artist_id":"A3","year":"not a number"}\n{"song_id": "S4", bad\n'
                    b'{"song_id":"S5","artist_id":"A5"}\r{"song_id":"S6","artist_id":"A6"}',
    "bom.json": b'\xef\xbb\xbf{"song_id":"S7","artist_id":"A7"}\n',
    "values.json": b'null\n123\n"text"\n[{"song_id":"S8","artist_id":"A8"}]\n[]\n',
    "more.json": b'{"song_id":"S9","artist_id":"A9"} trailing\n{"song_id":"S10","artist_id":"A10"},\n'
                 b'{"song_id":"S11","artist_id":"A11"} {"song_id":"S12","artist_id":"A12"}\n'
                 b'{"song_id":"S13","artist_id":"A13"}] [{}\n  {"song_id":"S14","artist_id":"A14", "x": [1, {}]}  \n',
    "number.json": b'{"song_id":"S15","artist_id":"A15","artist_name":112}\n',
    "empty.json": b"",
}


def test_each_line_is_one_json_object_or_rejected_whole_with_its_text(spark, tmp_path):
    folder = tmp_path / "song_data" / "A" / "B"
    folder.mkdir(parents=True)
    for name, data in SONG_FILES.items():
        (folder / name).write_bytes(data)
    (tmp_path / "log_data").mkdir()
    (tmp_path / "log_data" / "day.json").write_text('{"ts": 1, "userId": "1"} {"ts": 2}\n{"ts": 3}\n')
    x = etl.extract(spark, str(tmp_path), "s3://bucket/raw", [])
    assert rows(x.songs, "song_id") == [(f"S{i}",) for i in (1, 14, 15, 2, 5, 6, 7)]
    assert rows(x.songs.filter("song_id = 'S15'"), "artist_name") == [("112",)]
    bad = rows(x.rejects, "input", "file", "reason", "line")
    more = "more than one JSON value on the line"
    assert [r for r in bad if r[1].endswith("more.json")] == sorted(
        ("song_data", "s3://bucket/raw/song_data/A/B/more.json", more, line) for line in (
            '{"song_id":"S9","artist_id":"A9"} trailing', '{"song_id":"S10","artist_id":"A10"},',
            '{"song_id":"S11","artist_id":"A11"} {"song_id":"S12","artist_id":"A12"}',
            '{"song_id":"S13","artist_id":"A13"}] [{}'))
    malformed = [r[3] for r in bad if r[2] == "malformed JSON or wrong type"]
    assert sorted(malformed) == sorted(['{"song_id":"S3","artist_id":"A3","year":"not a number"}',
                                        '{"song_id": "S4", bad', "null", "123", '"text"',
                                        '[{"song_id":"S8","artist_id":"A8"}]', "[]"])
    assert [r for r in bad if r[0] == "log_data"] == [
        ("log_data", "s3://bucket/raw/log_data/day.json", more, '{"ts": 1, "userId": "1"} {"ts": 2}')]
    # every non-blank line is a record used or a reject
    assert x.counts == {"song_data": {"files": 7, "records": 18, "rejected": 11},
                        "log_data": {"files": 1, "records": 2, "rejected": 1}}
