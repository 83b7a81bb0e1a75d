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
