#!/usr/bin/env python3
"""Deterministic Sparkify input generator for benchmarks (the layouts of song_data/ and log_data/), streaming to disk.

    python bench/generate.py OUT --songs 10000 --events 1000000 [--days 30] [--seed 1]

Writes OUT/song_data/A/B/C/TRxxxxxxxxxxxxxxxx.json (one JSON object per file, as the Million Song
Dataset subset) and OUT/log_data/YYYY/MM/YYYY-MM-DD-events.json (newline-delimited events, one
file per day). Nothing is held in memory in proportion to the output: songs are written one by
one, events day by day. Distributions: artists with Zipf-like song counts, about a quarter of
artists without location, years with 0 for about half of the songs; events from ~N/1000 users in
sessions, ~82 % NextSong, plays drawn Zipf-like from the catalogue so some songs match exactly
and some (different duration or title) do not, and a few logged-out events with an empty userId.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import string

START_MS = 1541030400000  # 2018-11-01T00:00:00Z
DAY_MS = 86_400_000
PAGES = ["Home", "Settings", "Logout", "Help", "About", "Upgrade", "Downgrade", "Add to Playlist"]


def ident(rng: random.Random, prefix: str, n: int = 16) -> str:
    return prefix + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(n))


def song_record(i: int, n_artists: int, seed: int) -> dict:
    """Song i, computed from (seed, i) alone so that events can draw the same song again."""
    rng = random.Random(seed * 1_000_003 + i)
    artist = int(n_artists * rng.random() ** 2)  # skewed: a few artists have many songs
    arng = random.Random(seed * 7_919 + artist)
    located = arng.random() > 0.25
    return {
        "num_songs": 1,
        "artist_id": f"AR{artist:08d}{arng.randrange(16**6):06X}"[:18],
        "artist_latitude": round(arng.uniform(-60, 70), 5) if located else None,
        "artist_longitude": round(arng.uniform(-150, 150), 5) if located else None,
        "artist_location": f"City {artist % 997}, ST" if located else "",
        "artist_name": f"Artist {artist}",
        "song_id": f"SO{i:010d}{rng.randrange(16**6):06X}",
        "title": f"Song {i} {ident(rng, '', 4)}",
        "duration": round(rng.uniform(60, 600), 5),
        "year": 0 if rng.random() < 0.5 else rng.randint(1950, 2010),
    }


def write_songs(out: str, n: int, seed: int) -> None:
    n_artists = max(1, int(n * 0.64))
    letters = string.ascii_uppercase
    for i in range(n):
        rec = song_record(i, n_artists, seed)
        d = os.path.join(out, "song_data", letters[i % 26], letters[(i // 26) % 26], letters[(i // 676) % 26])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"TR{i:012d}{seed % 10000:04d}.json"), "w") as f:
            json.dump(rec, f)


def write_logs(out: str, n_songs: int, n_events: int, days: int, seed: int) -> None:
    rng = random.Random(seed)
    n_artists = max(1, int(n_songs * 0.64))
    n_users = max(10, n_events // 1000)
    users = [{"userId": str(u + 1), "firstName": f"First{u}", "lastName": f"Last{u}",
              "gender": rng.choice("MF"), "level": "free" if rng.random() < 0.3 else "paid",
              "location": f"Town {u % 300}, ST", "registration": float(START_MS - rng.randrange(10**10)),
              "userAgent": f"Mozilla/5.0 (agent {u % 40})"} for u in range(n_users)]
    per_day = n_events // days
    session = 0
    for day in range(days):
        t0 = START_MS + day * DAY_MS
        d = os.path.join(out, "log_data", "2018", f"{11 + (day >= 30):02d}")
        os.makedirs(d, exist_ok=True)
        date = f"2018-{11 + (day >= 30):02d}-{day % 30 + 1:02d}"
        count = per_day + (n_events - per_day * days if day == days - 1 else 0)
        with open(os.path.join(d, f"{date}-events.json"), "w") as f:
            written = 0
            while written < count:
                session += 1
                u = users[int(n_users * rng.random() ** 1.5)]
                if rng.random() < 0.05:
                    u["level"] = "paid" if u["level"] == "free" else "free"
                ts = t0 + rng.randrange(DAY_MS - 3_600_000)
                for item in range(min(rng.randint(1, 60), count - written)):
                    ts += rng.randint(1_000, 400_000)
                    logged_out = rng.random() < 0.02
                    page = "NextSong" if rng.random() < 0.82 else rng.choice(PAGES)
                    ev = {"artist": None, "auth": "Logged Out" if logged_out else "Logged In",
                          "firstName": None if logged_out else u["firstName"], "gender": u["gender"],
                          "itemInSession": item, "lastName": None if logged_out else u["lastName"],
                          "length": None, "level": u["level"], "location": u["location"],
                          "method": "PUT" if page == "NextSong" else "GET", "page": page,
                          "registration": u["registration"], "sessionId": session, "song": None,
                          "status": 200, "ts": min(ts, t0 + DAY_MS - 1), "userAgent": u["userAgent"],
                          "userId": "" if logged_out else u["userId"]}
                    if page == "NextSong" and not logged_out:
                        s = song_record(int(n_songs * rng.random() ** 3), n_artists, seed)
                        exact = rng.random() < 0.6
                        ev.update(artist=s["artist_name"], song=s["title"] if exact or rng.random() < 0.5
                                  else s["title"] + " (live)",
                                  length=s["duration"] if exact else round(s["duration"] + rng.uniform(0.5, 9), 5))
                    f.write(json.dumps(ev) + "\n")
                    written += 1


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--songs", type=int, default=10_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    write_songs(a.out, a.songs, a.seed)
    write_logs(a.out, a.songs, a.events, a.days, a.seed)
    print(f"wrote {a.songs:,} song files and {a.events:,} events over {a.days} days to {a.out}")


if __name__ == "__main__":
    main()
