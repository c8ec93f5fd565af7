"""Shared fixtures: one local Ray for the session, a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models: one intra-op thread is as fast as two, and immune to a busy machine's
    spin-waits (CI has 2 cores; Ray actors set their own thread count)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local moto S3 server. Yields its endpoint URL; credentials are dummies."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[k] = v
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; yields (bucket name, storage_options for fsspec/s3fs)."""
    import boto3

    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid() % 1000}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    yield name, {"endpoint_url": s3_endpoint, "skip_instance_cache": True}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (2 CPUs, like CI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", ignore_reinit_error=True)
    try:
        yield ray
    finally:
        ray.shutdown()


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory) -> str:
    """A copy of teachers/tiny.yaml (+ model JSONs) whose checkpoints live in a temp folder."""
    import shutil

    from dr_pipeline.models.tiny import make_tiny_checkpoints

    d = tmp_path_factory.mktemp("teachers")
    shutil.copy(REPO / "teachers" / "tiny.yaml", d / "tiny.yaml")
    shutil.copytree(REPO / "teachers" / "models", d / "models")
    make_tiny_checkpoints(str(d / "tiny.yaml"))
    return str(d / "tiny.yaml")


def write_job(path, **overrides) -> str:
    """Write a job YAML (dict overrides merged one level deep) and return its path."""
    import yaml

    job = {
        "input": {"urls": ""},
        "output": {"path": ""},
        "teachers": "",
        "seed": 0,
        "aug": {"n_aug": 2, "size": 64},
        "captions": {"k": 2},
        "execution": {
            "min_actors": 1,
            "max_actors": 2,
            "cpus_per_actor": 1,
            "batch_size": 5,
            "max_attempts": 2,
            "device": "cpu",
            "decode_threads": 1,
        },
    }
    for k, v in overrides.items():
        job[k] = {**job[k], **v} if isinstance(v, dict) and isinstance(job.get(k), dict) else v
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return str(path)
