#!/usr/bin/env python3
"""Time etl.py at a named scale, interleaved with what it is compared against; prints medians
and ratios (it asserts nothing: figures to compare run to run, on one machine).

    python bench/run.py sample --repeat 5
    python bench/run.py full --repeat 3 --s3            # also from and to S3 (SeaweedFS on loopback)
    python bench/run.py M --repeat 3 --course-style     # generates bench/out/M once

Scales: sample (the bundled data/), full (data/song_data_full.tar.gz with the sample's logs),
S (1,000 songs / 100,000 events), M (10,000 / 1,000,000), L (100,000 / 10,000,000).
Each round runs every job once, in turn, so that a busy machine slows them alike.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, "out")
SAMPLE = os.path.join(ROOT, "data")
SCALES = {"S": (1_000, 100_000), "M": (10_000, 1_000_000), "L": (100_000, 10_000_000)}


def input_for(scale: str) -> str:
    """The input folder of a scale, made once under bench/out/."""
    if scale == "sample":
        return SAMPLE
    root = os.path.join(WORK, scale)
    if os.path.isdir(os.path.join(root, "song_data")):
        return root
    os.makedirs(root, exist_ok=True)
    if scale == "full":
        with tarfile.open(os.path.join(SAMPLE, "song_data_full.tar.gz")) as tar:
            tar.extractall(os.path.join(root, "unpacked"))
        found = [d for d, dirs, _ in os.walk(os.path.join(root, "unpacked")) if os.path.basename(d) == "song_data"]
        os.rename(found[0], os.path.join(root, "song_data"))
        shutil.copytree(os.path.join(SAMPLE, "log_data"), os.path.join(root, "log_data"))
    else:
        songs, events = SCALES[scale]
        subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), root, "--songs", str(songs),
                        "--events", str(events)], check=True)
    return root


def timed(cmd: list, env: dict) -> float:
    """Wall seconds of a whole command; its output is kept only when it fails."""
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return seconds


def start_s3(inp: str):
    """A SeaweedFS server on loopback with the input uploaded under s3://bench/input."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    import create_s3
    import s3server

    server = s3server.start(os.path.join(WORK, f"seaweedfs-{os.getpid()}"))
    client = server.client()
    client.create_bucket(Bucket="bench")
    print(f"uploaded {create_s3.upload_tree(client, inp, 'bench', 'input'):,} input files to S3", flush=True)
    return server


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scale", choices=["sample", "full", *SCALES])
    p.add_argument("--repeat", type=int, default=3, help="rounds (default 3); medians are printed")
    p.add_argument("--s3", action="store_true", help="also run the job from and to S3 (SeaweedFS on loopback)")
    p.add_argument("--course-style", action="store_true",
                   help="also run bench/course_style_etl.py, the job as typical course solutions write it")
    p.add_argument("--baseline", metavar="ETL_PY", help="also run another version of etl.py on the same input")
    a = p.parse_args(argv)
    inp = input_for(a.scale)
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    out = os.path.join(WORK, f"{a.scale}-lake")
    jobs = {"etl.py": [sys.executable, os.path.join(ROOT, "etl.py"), "--input", inp, "--output", out]}
    if a.baseline:
        jobs["baseline"] = [sys.executable, os.path.abspath(a.baseline), "--input", inp, "--output", out + "-base"]
    if a.course_style:
        jobs["course-style"] = [sys.executable, os.path.join(HERE, "course_style_etl.py"), inp, out + "-course"]
    server = start_s3(inp) if a.s3 else None
    if server:
        env.update(server.env())
        jobs["etl.py on S3"] = [sys.executable, os.path.join(ROOT, "etl.py"), "--input", "s3://bench/input",
                                "--output", "s3://bench/lake"]
    try:
        times = {name: [] for name in jobs}
        for i in range(a.repeat):
            for name, cmd in jobs.items():
                shutil.rmtree(out + "-course", ignore_errors=True)  # it cannot overwrite its output
                times[name].append(timed(cmd, env))
                print(f"round {i + 1}: {name:<14} {times[name][-1]:7.1f} s", flush=True)
    finally:
        if server:
            server.stop()
    first = statistics.median(times["etl.py"])
    print(f"\n{a.scale}, {a.repeat} rounds, whole processes, medians (min-max):")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<14} {med:7.1f} s  ({min(ts):.1f}-{max(ts):.1f})  {med / first:5.2f}x etl.py")


if __name__ == "__main__":
    main()
