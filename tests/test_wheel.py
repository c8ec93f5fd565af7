"""`pip install .` (a wheel, not -e) works outside the checkout: the schemas and the shipped
teachers travel as package data, and `dr` runs a job from an unrelated folder.

The wheel is built from this checkout and installed with --no-deps into a fresh venv whose
dependencies come from the project's venv (a .pth line), so the test checks the wheel's own
contents without downloading torch again. Nothing of the checkout is importable there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


@pytest.mark.timeout(900)
def test_wheel_installs_and_runs_a_job_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        tmp_path,
        env,
    )
    [wheel] = wheels.glob("dr_pipeline-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, ray, ... of our venv
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**env, "PATH": f"{venv / 'bin'}:{env['PATH']}"}
    where = _run(
        [
            str(py),
            "-c",
            "import dr_pipeline, dr_pipeline.shards.schema as s; print(dr_pipeline.__file__); "
            "print(s.schema_path('shard-stats-v1.schema.json'))",
        ],
        work,
        env,
    ).split()
    assert str(venv) in where[0] and str(REPO) not in where[0]  # the installed copy, not the checkout
    assert Path(where[1]).is_file() and str(venv) in where[1]  # schemas shipped as package data
    dr = str(venv / "bin" / "dr")
    _run([dr, "make-corpus", "corpus", "--shards", "2", "--per-shard", "4", "--seed", "0"], work, env)
    _run([dr, "make-teachers", "pkg:teachers/tiny.yaml"], work, env)
    job = work / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "input": {"urls": "corpus/tar"},
                "output": {"path": "ds"},
                "teachers": "pkg:teachers/tiny.yaml",
                "aug": {"n_aug": 2, "size": 64},
                "captions": {"k": 2},
                "execution": {"batch_size": 4, "device": "cpu"},
            }
        )
    )
    _run([dr, "reinforce", "--config", "job.yaml", "--local"], work, env)
    out = _run([dr, "validate", "ds"], work, env)
    assert out.rstrip().endswith("OK") and "2 committed shard(s), 8 samples checked" in out
