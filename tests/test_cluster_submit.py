"""The cluster path as a user takes it (issue 17): the shipped demo config from an unrelated folder,
through `ray job submit` against a Ray head this test starts (job server: ray[default]), and the
KubeRay RayJob checked against KubeRay's CRD schema.

The head gets its own ports and temp dir and is stopped by its process group (never `ray stop`,
which would stop every Ray on the machine). The demo config is copied verbatim into a miniature
checkout under tmp (jobs/configs/demo.yaml, jobs/reinforce.py, out/demo/corpus) so the shared
checkout's out/ is never touched; the package comes from the installed dr_pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# As from an activated venv (the job driver's `python` is the head's); Ray's token auth off for the test head.
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A miniature checkout: the demo config verbatim, the entrypoint, a 4-shard web corpus in out/."""
    from dr_pipeline.corpus.synthetic import make_split

    root = tmp_path_factory.mktemp("proj")
    (root / "jobs" / "configs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "configs" / "demo.yaml", root / "jobs" / "configs" / "demo.yaml")
    shutil.copy(REPO / "jobs" / "reinforce.py", root / "jobs" / "reinforce.py")
    make_split("web", str(root / "out" / "demo" / "corpus"), n_shards=4, per_shard=1, seed=0, formats=("tar",))
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / "out" / "demo" / "dataset" / "manifest.json").read_text())


def _fresh(root: Path) -> None:
    shutil.rmtree(root / "out" / "demo" / "dataset", ignore_errors=True)


@pytest.mark.timeout(320)
def test_demo_config_runs_from_an_unrelated_folder(project, tmp_path):
    """Relative config path, relative paths inside it, a pkg: ensemble: all resolve from elsewhere."""
    _fresh(project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = os.path.relpath(project / "jobs" / "configs" / "demo.yaml", elsewhere)
    r = subprocess.run(
        [sys.executable, str(project / "jobs" / "reinforce.py"), "--config", config, "--local"],
        cwd=elsewhere,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = _manifest(project)
    assert m["n_shards"] == 4 and m["n_written"] + m["n_rejected"] == 4
    assert not (elsewhere / "out").exists()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_under(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the head's own temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM then SIGKILL the head's process group, then anything still naming its temp dir."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    for pid in _pids_under(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with the job server on free ports, in its own session and temp dir."""
    import importlib.util

    if importlib.util.find_spec("aiohttp_cors") is None:
        pytest.fail("the job server needs ray[default]: pip install -e '.[test]' (or '.[cluster]')")
    temp_dir = tmp_path_factory.mktemp("rh")  # short: Ray's socket paths must stay < 108 chars
    if len(str(temp_dir)) > 60:
        import tempfile

        temp_dir = Path(tempfile.mkdtemp(prefix="drh-", dir="/tmp"))
    lo = 30000 + os.getpid() % 200 * 100  # worker ports away from Ray's default 10002-19999
    ports = [p for p in _free_ports(30) if not lo <= p <= lo + 99]  # and away from the component ports
    gcs, dash, client, nm, om, agent, agent_grpc, rt_env, metrics = ports[:9]
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}",
        f"--metrics-export-port={metrics}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 99}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
    ]
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Ray head did not come up: {(temp_dir / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_head(proc, str(temp_dir))
        log.close()


def _submit(url: str, cwd: Path, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- ENTRYPOINT` from ``cwd``, as the README has it."""
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--", *entrypoint],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.timeout(420)  # head start + 2 submissions: 2.5 min measured on 2 shared, loaded cores
def test_demo_config_via_ray_job_submit(project, ray_head):
    """README: `ray job submit --working-dir . -- python jobs/reinforce.py --config "$PWD/jobs/configs/demo.yaml"`.
    A relative --config lands in Ray's uploaded copy: refused at config time with the fix."""
    _fresh(project)
    r = _submit(ray_head, project, "python", "jobs/reinforce.py", "--config", "jobs/configs/demo.yaml")
    text = r.stdout + r.stderr
    assert "--working-dir copy Ray uploaded" in text and "$PWD/jobs/configs" in text, text[-3000:]
    assert not (project / "out" / "demo" / "dataset").exists()

    r = _submit(ray_head, project, "python", "jobs/reinforce.py", "--config", f"{project}/jobs/configs/demo.yaml")
    text = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in text, text[-3000:]
    m = _manifest(project)
    assert m["n_shards"] == 4 and m["n_written"] + m["n_rejected"] == 4


# --------------------------------------------------------------------------- KubeRay RayJob

CRD = REPO / "tests" / "data" / "kuberay-rayjob-crd-v1.schema.json"
IMAGE_ROOT = "/home/ray/dr_pipeline"  # where the Dockerfile puts the project (DR_HOME)


def test_rayjob_renders_and_validates_against_the_kuberay_crd_schema():
    """jobs/kuberay-rayjob.yaml against the openAPIV3Schema of KubeRay's ray.io_rayjobs CRD (vendored
    subset, tests/data); its image is the project's Dockerfile image; its entrypoint names shipped files."""
    import jsonschema

    docs = [d for d in yaml.safe_load_all((REPO / "jobs" / "kuberay-rayjob.yaml").read_text()) if d]
    rayjob = next(d for d in docs if d.get("kind") == "RayJob")
    schema = json.loads(CRD.read_text())
    jsonschema.validate(rayjob, schema)
    spec = rayjob["spec"]
    images = {
        c["image"]
        for g in [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert len(images) == 1 and next(iter(images)).split("/")[-1].startswith("dr-pipeline:")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=rayproject/ray:" in dockerfile and "-cu12" in dockerfile  # Ray's CUDA image
    assert "[cluster]" in dockerfile and f"ENV DR_HOME={IMAGE_ROOT}" in dockerfile and "COPY" in dockerfile
    entry = spec["entrypoint"].split()
    for path in (entry[entry.index("python") + 1], entry[entry.index("--config") + 1]):
        assert path.startswith(f"{IMAGE_ROOT}/") and (REPO / path[len(IMAGE_ROOT) + 1 :]).is_file(), path
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    for broken in (
        {**spec, "backofLimit": 2},  # unknown key (kubectl: strict)
        {
            **spec,
            "rayClusterSpec": {**spec["rayClusterSpec"], "workerGroupSpecs": [{**workers[0], "replicas": "eight"}]},
        },
    ):
        with pytest.raises(jsonschema.ValidationError):  # the schema does bite
            jsonschema.validate({**rayjob, "spec": broken}, schema)
    cluster = yaml.safe_load((REPO / "jobs" / "cluster.yaml").read_text())
    assert {cluster["docker"]["image"]} == images  # the launcher runs the same image
