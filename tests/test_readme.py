"""The README's commands work as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import s3server


def readme_block(marker: str) -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    m = re.search(rf"<!-- test: {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README has no block marked {marker}"
    return m.group(1)


@pytest.mark.s3
def test_readme_s3_walkthrough_runs_as_written(tmp_path):
    script = readme_block("s3-walkthrough")
    assert "8333" in script
    script = script.replace("8333", str(s3server.free_ports(1)[0]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "SPARKIFY_"))}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               SPARK_LOCAL_IP="127.0.0.1", TMPDIR=str(tmp_path))
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900, check=False)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "uploaded 101 sample files" in r.stdout
    assert "checks: 20 of 20 passed" in r.stdout and "6,820" in r.stdout
    assert "bucket sparkify-lake deleted" in r.stdout


INTERNAL = re.compile(r"SPEC|§|\.\./shared|\b[Ss]tops? \d+\b|[Ii]ssue #?\d+|\bsession \d+\b|\bphase \d+\b")


def test_nothing_a_user_reads_speaks_of_how_the_project_was_built(analytics_cli):
    texts = {}
    for name in ("README.md", "bench/PERFORMANCE.md", "dl.cfg", *[f"queries/{q}" for q in
                                                                   os.listdir(os.path.join(ROOT, "queries"))]):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            texts[name] = f.read()
    for script in ("etl.py", "analytics.py", "create_s3.py", "delete_s3.py", "bench/run.py"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True,
                           text=True, timeout=120, check=False)
        texts[f"{script} --help"] = r.stdout
    r, _ = analytics_cli
    assert r.returncode == 0, r.stderr
    texts["analytics.py output"] = r.stdout
    found = {name: INTERNAL.findall(text) for name, text in texts.items()}
    assert {name: hits for name, hits in found.items() if hits} == {}
