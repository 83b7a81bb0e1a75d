#!/usr/bin/env python3
"""Benchmark etl.py at named scales, side by side with a bare Spark read and (optionally) the
course-style job.  Prints figures to compare run to run; it asserts nothing.

    python bench/run.py sample [--repeat 3] [--course-style] [--bare-read]
    python bench/run.py M --repeat 3 --course-style      # generates bench/out/M once

Scales: sample (bundled data/), full (../shared song_data_full.tar.gz + sample logs),
S (1,000 songs / 100,000 events), M (10,000 / 1,000,000), L (100,000 / 10,000,000).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
WORK = os.path.join(HERE, "out")
SCALES = {"S": (1_000, 100_000), "M": (10_000, 1_000_000), "L": (100_000, 10_000_000)}
TABLES = ("songplays", "users", "songs", "artists", "time")

BARE_READ = f"""
import os, sys, time
sys.path.insert(0, {ROOT!r})
import etl
cfg = etl.load_config(["--input", sys.argv[1]])
spark = etl.build_spark(cfg)
for name, schema in (("song_data", etl.song_schema()), ("log_data", etl.log_schema())):
    etl.read_json(spark, [os.path.join(sys.argv[1], name)], schema).count()
spark.stop()
"""


def input_for(scale: str) -> str:
    if scale == "sample":
        return os.path.join(ROOT, "data")
    target = os.path.join(WORK, f"input-{scale}")
    if os.path.isdir(target):
        return target
    os.makedirs(WORK, exist_ok=True)
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if scale == "full":
        with tarfile.open(os.path.join(SHARED, "data", "song_data_full.tar.gz")) as tar:
            tar.extractall(tmp)
        shutil.copytree(os.path.join(ROOT, "data", "log_data"), os.path.join(tmp, "log_data"))
    else:
        songs, events = SCALES[scale]
        subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), tmp, "--songs", str(songs),
                        "--events", str(events)], check=True)
    os.replace(tmp, target)
    return target


def timed(cmd: list, env: dict) -> tuple:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall, peak, r


def layout(out: str) -> dict:
    figures = {}
    for t in TABLES:
        files = dirs = 0
        for _, _, fs in os.walk(os.path.join(out, t)):
            parquet = [f for f in fs if f.endswith(".parquet")]
            files += len(parquet)
            dirs += bool(parquet)
        figures[t] = (files, dirs)
    return figures


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scale", choices=["sample", "full", *SCALES])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--course-style", action="store_true", help="also run ../shared/bench/course_style_etl.py")
    p.add_argument("--bare-read", action="store_true", help="also time a bare Spark start + read + stop")
    a = p.parse_args(argv)
    inp = input_for(a.scale)
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    jobs = {"etl.py": lambda out: [sys.executable, os.path.join(ROOT, "etl.py"), "--input", inp, "--output", out]}
    if a.bare_read:
        jobs["bare read"] = lambda out: [sys.executable, "-c", BARE_READ, inp]
    if a.course_style:
        jobs["course-style"] = lambda out: [sys.executable, os.path.join(SHARED, "bench", "course_style_etl.py"),
                                            inp, out]
    walls = {name: [] for name in jobs}
    for i in range(a.repeat):
        for name, cmd in jobs.items():  # interleaved, so that machine noise hits every job alike
            out = os.path.join(WORK, f"lake-{a.scale}-{name.replace(' ', '-')}")
            shutil.rmtree(out, ignore_errors=True)
            wall, peak, r = timed(cmd(out), env)
            walls[name].append(wall)
            print(f"run {i + 1} {name:<13} {wall:7.1f}s  peak RSS {peak:,.0f} MB (Python side; JVM not counted)",
                  flush=True)
            if name == "etl.py":
                stages = re.findall(r"INFO (\w[\w ]*?)\s+([0-9.]+)s\s+\(total", r.stderr)
                print("   stages: " + ", ".join(f"{s.strip()} {float(v):.1f}s" for s, v in stages))
                rows = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"^\s+(\w+)\s+([\d,]+)\s+[\d,]+\s+[\d.]+$",
                                                                            r.stdout, re.M)}
                for t, (files, dirs) in layout(out).items():
                    print(f"   {t:<10} rows {rows.get(t, 0):>12,}  parquet files {files:>7,}  "
                          f"partition dirs {dirs:>7,}")
    print(f"\nscale {a.scale}: medians of {a.repeat} runs")
    med = {name: statistics.median(v) for name, v in walls.items()}
    for name, m in med.items():
        print(f"  {name:<13} {m:7.1f}s" + (f"   ({m / med['etl.py']:.1f}x etl.py)" if name != "etl.py" else ""))


if __name__ == "__main__":
    main()
