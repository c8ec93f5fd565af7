"""The CLI answers at once: help, config errors and `dr plan` import none of torch, open_clip,
ray or transformers (checked in a fresh interpreter); help shows defaults and an example;
`--device cuda` without CUDA and non-dataset paths are one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dr_pipeline import cli

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "ray", "transformers", "timm")

# One interpreter runs every argv in turn and reports exit code, heavy modules loaded so far, stderr.
PROBE = r"""
import contextlib, io, json, sys
from dr_pipeline import cli
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    out.append({"argv": argv, "code": code, "heavy": [m for m in %r if m in sys.modules], "stderr": err.getvalue()})
print(json.dumps(out))
""" % (HEAVY,)


def probe(argvs: list[list[str]], cwd: Path, **env) -> list[dict]:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _commands() -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "cmd")
    return list(sub.choices)


@pytest.fixture
def job(tmp_path) -> Path:
    """A valid job whose ensemble needs no checkpoints to load the config (models are never built)."""
    p = tmp_path / "job.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "input": {"urls": "corpus/shard-{00000..00001}.tar"},
                "output": {"path": "ds"},
                "teachers": "pkg:teachers/synthetic.yaml",
                "execution": {"device": "cpu"},
            }
        )
    )
    return p


def test_help_config_errors_and_plan_import_nothing_heavy(tmp_path, job):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {urls: x}\noutput: {path: o}\nteachers: pkg:teachers/tiny.yaml\nexecutoin: {}\n")
    argvs = [
        ["--help"],
        *([c, "--help"] for c in _commands()),
        ["reinforce", "--config", str(bad)],
        ["reinforce", "--config", str(tmp_path / "missing.yaml")],
        ["reinforce", "--config", str(job), "--device", "cuda", "--local"],
        ["inspect", str(tmp_path)],
        ["plan", "--samples", "1.9B", "--ensemble", "teachers/dfndr2b.yaml"],
    ]
    res = probe(argvs, cwd=REPO, CUDA_VISIBLE_DEVICES="")
    for r in res:
        assert r["heavy"] == [], f"{r['argv']} imported {r['heavy']}"
    codes = {" ".join(r["argv"]): (r["code"], r["stderr"]) for r in res}
    assert all(c in (0, None) for a, (c, _) in codes.items() if a.endswith("--help") or a.startswith("plan"))
    for r in res[-5:-1]:
        assert r["code"] == 2 and r["stderr"].count("\n") == 1 and r["stderr"].startswith("error: "), r
    assert "did you mean 'execution'" in res[-5]["stderr"]
    assert "no CUDA device" in res[-3]["stderr"]
    assert "not a dr_pipeline dataset" in res[-2]["stderr"]


def test_every_command_help_shows_defaults_and_an_example(capsys):
    for cmd in _commands():
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        text = capsys.readouterr().out
        assert f"example:\n  dr {cmd}" in text, cmd
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    assert "(default: 64)" in capsys.readouterr().out


def test_cuda_on_ray_needs_gpus_per_actor(job, capsys, monkeypatch):
    """`device: cuda` with gpus_per_actor 0: Ray hides every GPU from the actors; refused at config time,
    also when the job goes to a cluster (where the driver's own machine is not checked)."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert cli.main(["reinforce", "--config", str(job), "--device", "cuda"]) == 2
    assert "gpus_per_actor is 0" in capsys.readouterr().err


def test_cuda_check_skips_cluster_runs():
    from dr_pipeline.config import ConfigError, ExecutionSpec, check_device

    ex = ExecutionSpec(device="cuda", gpus_per_actor=1)
    check_device(ex, "ray", local_machine=False)  # GPUs are on the workers: not checked here
    os.environ["CUDA_VISIBLE_DEVICES"], old = "", os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        with pytest.raises(ConfigError, match="no CUDA device"):
            check_device(ex, "ray", local_machine=True)
    finally:
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old
