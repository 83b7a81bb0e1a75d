#!/usr/bin/env python3
"""Benchmark etl.py at named scales, side by side with a bare Spark read and (optionally) the
course-style job.  Prints figures to compare run to run; it asserts nothing.

    python bench/run.py sample [--repeat 3] [--course-style] [--bare-read]
    python bench/run.py M --repeat 3 --course-style      # generates bench/out/M once
    python bench/run.py M --repeat 3 --warm              # also the job's second run in one JVM

Scales: sample (bundled data/), full (../shared song_data_full.tar.gz + sample logs),
S (1,000 songs / 100,000 events), M (10,000 / 1,000,000), L (100,000 / 10,000,000).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
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
# each input read as etl.py reads it (small song files whole, log files by line)
etl.read_song_data(spark, os.path.join(sys.argv[1], "song_data"), True)[0].count()
etl.read_json(spark, [os.path.join(sys.argv[1], "log_data")], etl.log_schema()).count()
etl.stop_spark(spark, keep_archive=False)  # the class archive is etl.py's to write
"""


# The same read on a session with Spark's defaults (no settings, JVM options or class archive of
# etl.py's): for context only; the yardstick is BARE_READ, the start etl.py itself gets.
BARE_READ_DEFAULTS = f"""
import os, sys
sys.path.insert(0, {ROOT!r})
import etl
from pyspark.sql import SparkSession
spark = SparkSession.builder.getOrCreate()
spark.sparkContext.setLogLevel("ERROR")
for name, schema in (("song_data", etl.song_schema()), ("log_data", etl.log_schema())):
    etl.read_json(spark, [os.path.join(sys.argv[1], name)], schema).count()
spark.stop()
"""


# The job's second run in one JVM, after a first run on the same input has loaded its classes,
# compiled its hot code and planned its queries once: what a run costs without a fresh JVM's
# start-up (JIT compilation, interpreted first passes, cold planning).  For context, like
# BARE_READ_DEFAULTS: every real run of etl.py starts a fresh JVM.  Prints the timed run's wall
# and CPU seconds (the process tree's: Python and the JVM).
WARM_RUN = f"""
import os, sys, time
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {HERE!r})
import etl
from run import tree_stats
inp, out = sys.argv[1], sys.argv[2]
spark = etl.build_spark(etl.load_config(["--input", inp, "--output", out + "-warm-up"]))
assert etl.run(etl.load_config(["--input", inp, "--output", out + "-warm-up"]), spark) == 0
os.sync()
cpu0, t = {{}}, time.perf_counter()
tree_stats(os.getpid(), cpu0)
assert etl.run(etl.load_config(["--input", inp, "--output", out]), spark) == 0
wall, cpu1 = time.perf_counter() - t, {{}}
tree_stats(os.getpid(), cpu1)
print(f"WARM RUN {{wall:.3f}} {{sum(cpu1.values()) - sum(cpu0.values()):.3f}}", flush=True)
etl.stop_spark(spark, keep_archive=False)
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


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_stats(pid: int, cpu: dict) -> float:
    """Resident memory of a process and all its descendants (the JVM included), from /proc, in
    MB; records each one's CPU time so far in cpu (pid -> seconds)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        cpu[p] = max(cpu.get(p, 0.0), cpu_seconds(p))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total / 2**20


def timed(cmd: list, env: dict, server_pid: int | None = None) -> tuple:
    """(wall seconds, peak RSS of the whole process tree in MB, its CPU seconds, the S3 server's
    CPU seconds meanwhile, completed process).  The wall time ends when the process exits (not at
    the next sample), and the disk's pending writes of earlier runs are flushed before it starts,
    so that one run's writeback is not timed in the next.  The tree's CPU time is sampled every
    0.2 s (a process's last 0.2 s can be missed, so it errs low); the JVM's is most of it."""
    os.sync()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        server0 = cpu_seconds(server_pid) if server_pid else 0.0
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        peak, cpu = [0.0], {}

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_stats(proc.pid, cpu))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - t
        server = cpu_seconds(server_pid) - server0 if server_pid else 0.0
        sampler.join()
        out.seek(0)
        err.seek(0)
        r = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall, peak[0], sum(cpu.values()), server, r


# Creating files on a disk soon after many were deleted can cost far more than creating them on
# a quiet one: on this project's machine (ext4 without a journal) every new inode is checked
# against recently deleted ones for a minute after a deletion (the kernel's recently_deleted());
# writing the songs table's 8,030 directories took 9-12 s right after the previous output was
# deleted, against about 1.5 s on /dev/shm.  So a run never writes where an earlier run was just
# deleted: every run gets a new output folder, and the outputs of earlier benchmarks are deleted
# before the first timed run, followed by a pause long enough for that window to pass.
SETTLE_SECONDS = 65


def retire_old_outputs() -> None:
    """Delete the outputs of earlier benchmarks (lake-*, the S3 server's folder), then wait until
    the deletions no longer slow down file creation."""
    if not os.path.isdir(WORK):
        return
    old = [os.path.join(WORK, d) for d in os.listdir(WORK) if d.startswith("lake-") or d == "seaweedfs"]
    if not old:
        return
    print(f"deleting {len(old)} earlier outputs in {WORK}, then waiting {SETTLE_SECONDS}s for the disk "
          "to settle", flush=True)
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    os.sync()
    time.sleep(SETTLE_SECONDS)


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


def s3_layout(client, bucket: str, prefix: str) -> dict:
    import etl

    keys = etl.list_keys(client, bucket, prefix + "/")
    figures = {}
    for t in TABLES:
        parquet = [k for k in keys if k.startswith(f"{prefix}/{t}/") and k.endswith(".parquet")]
        figures[t] = (len(parquet), len({k.rsplit("/", 1)[0] for k in parquet}))
    return figures


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scale", choices=["sample", "full", *SCALES])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--course-style", action="store_true", help="also run ../shared/bench/course_style_etl.py")
    p.add_argument("--bare-read", action="store_true", help="also time a bare Spark start + read + stop")
    p.add_argument("--warm", action="store_true", help="also time etl.py's second run in one JVM (for context: "
                   "what a run costs without a fresh JVM's start-up)")
    p.add_argument("--s3", action="store_true", help="also run etl.py from and to S3: a SeaweedFS server "
                   "on loopback (weed, from requirements-dev.txt), input uploaded once")
    a = p.parse_args(argv)
    inp = input_for(a.scale)
    retire_old_outputs()
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    jobs = {"etl.py": lambda out: [sys.executable, os.path.join(ROOT, "etl.py"), "--input", inp, "--output", out]}
    server = None
    if a.s3:
        server, s3_env = start_s3(inp)
        env.update(s3_env)
        # A fresh output prefix per run, as the local runs get a fresh folder.
        jobs["etl.py s3"] = lambda out: [sys.executable, os.path.join(ROOT, "etl.py"), "--input",
                                         "s3a://bench/input", "--output", f"s3a://bench/{s3_prefix(out)}"]
    try:
        run_jobs(a, inp, jobs, env, server)
    finally:
        if server:
            server.stop()


def start_s3(inp: str) -> tuple:
    """A SeaweedFS server in bench/out/seaweedfs with the input uploaded to s3://bench/input."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    import create_s3
    import s3server

    work = os.path.join(WORK, "seaweedfs")  # an earlier one went with retire_old_outputs
    server = s3server.start(work)
    client = server.client()
    client.create_bucket(Bucket="bench")
    t = time.perf_counter()
    n = create_s3.upload_tree(client, inp, "bench", "input")
    print(f"uploaded {n:,} input files to s3://bench/input in {time.perf_counter() - t:.1f}s", flush=True)
    return server, server.env()


def s3_prefix(out: str) -> str:
    return os.path.basename(out)


def run_jobs(a, inp: str, jobs: dict, env: dict, server=None) -> None:
    s3_client = server.client() if server else None
    if a.bare_read:
        jobs["bare read"] = lambda out: [sys.executable, "-c", BARE_READ, inp]
        jobs["bare defaults"] = lambda out: [sys.executable, "-c", BARE_READ_DEFAULTS, inp]
    if a.course_style:
        jobs["course-style"] = lambda out: [sys.executable, os.path.join(SHARED, "bench", "course_style_etl.py"),
                                            inp, out]
    if a.warm:
        jobs["warm JVM"] = lambda out: [sys.executable, "-c", WARM_RUN, inp, out]
    walls = {name: [] for name in jobs}
    cpus = {name: [] for name in jobs}  # the job's process tree, plus the S3 server's for S3 runs
    for i in range(a.repeat):
        for name, cmd in jobs.items():  # interleaved, so that machine noise hits every job alike
            # A new folder (or S3 prefix) per run: nothing is deleted between timed runs.
            out = os.path.join(WORK, f"lake-{a.scale}-{name.replace(' ', '-')}-run{i + 1}")
            on_s3 = name.endswith(" s3")
            wall, peak, cpu, server_cpu, r = timed(cmd(out), env, server.proc.pid if on_s3 else None)
            if name == "warm JVM":  # the second run alone, as the process timed it
                wall, cpu = map(float, re.search(r"^WARM RUN ([\d.]+) ([\d.]+)$", r.stdout, re.M).groups())
            walls[name].append(wall)
            cpus[name].append(cpu + server_cpu)
            print(f"run {i + 1} {name:<13} {wall:7.1f}s  peak RSS {peak:,.0f} MB (Python + JVM)  CPU {cpu:.1f}s"
                  + (f" + S3 server {server_cpu:.1f}s" if on_s3 else ""), flush=True)
            if name.startswith("etl.py"):
                stages = re.findall(r"INFO (\w[\w ]*?)\s+([0-9.]+)s\s+\(total", r.stderr)
                print("   stages: " + ", ".join(f"{s.strip()} {float(v):.1f}s" for s, v in stages))
                rows = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"^\s+(\w+)\s+([\d,]+)\s+[\d,]+\s+[\d.]+$",
                                                                            r.stdout, re.M)}
                figures = s3_layout(s3_client, "bench", s3_prefix(out)) if "s3" in name else layout(out)
                for t, (files, dirs) in figures.items():
                    print(f"   {t:<10} rows {rows.get(t, 0):>12,}  parquet files {files:>7,}  "
                          f"partition dirs {dirs:>7,}")
    print(f"\nscale {a.scale}: medians of {a.repeat} runs")
    med = {name: statistics.median(v) for name, v in walls.items()}
    cores = os.cpu_count() or 1
    for name, m in med.items():
        print(f"  {name:<13} {m:7.1f}s" + (f"   ({m / med['etl.py']:.2f}x etl.py)" if name != "etl.py" else ""))
    # No run can take less wall time than its CPU time spread over every core.
    print(f"  CPU seconds (and the least wall time they allow on {cores} cores):")
    for name, v in cpus.items():
        c = statistics.median(v)
        print(f"  {name:<13} {c:7.1f}   ({c / cores:.1f}s)")
    for name in ("bare read", "bare defaults"):
        if name in med:
            print(f"  etl.py = {med['etl.py'] / med[name]:.2f}x {name}")
    if "warm JVM" in med:
        print(f"  etl.py's second run in a warm JVM: {med['warm JVM']:.1f}s, {med['warm JVM'] / med['etl.py']:.2f}x a "
              "whole run of etl.py (which starts a fresh JVM)")
        if "course-style" in med:
            print(f"  course-style = {med['course-style'] / med['warm JVM']:.1f}x etl.py's second run in a warm JVM")


if __name__ == "__main__":
    main()
