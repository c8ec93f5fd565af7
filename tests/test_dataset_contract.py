"""The reinforced-dataset contract (shards/dataset.py) and the driver's bookkeeping at scale.

- every marker and manifest the pipeline writes validates against the JSON Schemas in schemas/;
- ``fake_reinforce`` writes through the same commit path: its output passes ``dr validate``;
- planning costs a bounded number of storage calls whatever the number of shards: two output
  listings, the manifest, and only the marker bodies committed after its last checkpoint;
- the manifest is the driver's checkpoint: a driver interrupted mid-job leaves every committed shard in it;
- ``dr status`` on a finished and on a running job, local and on moto S3, from the files alone.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import fsspec
import jsonschema
import pytest

from dr_pipeline.bench_scale import StandInProcessor, make_scale_job, shard_names, write_job_file
from dr_pipeline.cli import main as dr
from dr_pipeline.config import load_ensemble, load_job
from dr_pipeline.corpus.synthetic import make_corpus
from dr_pipeline.execute.progress import Progress
from dr_pipeline.execute.runner import plan_job, run_job
from dr_pipeline.shards.dataset import Manifest, ReinforcedDataset, ShardStats
from dr_pipeline.shards.schema import json_schema
from dr_pipeline.status import job_status
from dr_pipeline.storage.folder import Folder
from dr_pipeline.train.fake_reinforce import make_fake_reinforced
from dr_pipeline.validate import validate_dataset


def assert_schema_valid(root: str, storage_options: dict | None = None) -> int:
    """Every marker and the manifest of ``root`` against schemas/; returns the number of markers."""
    ds = ReinforcedDataset(root, storage_options)
    names = sorted(ds.listing().markers)
    for n in names:
        jsonschema.validate(ds.folder.read_json(ds.marker_rel(n)), json_schema("shard-stats"))
    jsonschema.validate(ds.folder.read_json("manifest.json"), json_schema("manifest"))
    return len(names)


def _tiny_job(tmp_path: Path, tiny_ensemble: str, per_shard: int, n_aug: int, k: int) -> Path:
    """A 2-shard synthetic corpus and a job file reinforcing it with the tiny ensemble on CPU."""
    make_corpus(str(tmp_path / "corpus"), n_shards=2, per_shard=per_shard, seed=0, formats=("tar",))
    cfg = tmp_path / "job.yaml"
    job = {
        "input": {"urls": str(tmp_path / "corpus" / "tar")},
        "output": {"path": str(tmp_path / "ds")},
        "teachers": tiny_ensemble,
        "aug": {"n_aug": n_aug, "size": 64},
        "captions": {"k": k},
        "execution": {"batch_size": 4, "device": "cpu"},
    }
    cfg.write_text(json.dumps(job))
    return cfg


@pytest.fixture(scope="module")
def fake_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contract")
    make_corpus(str(root / "corpus"), n_shards=3, per_shard=6, seed=0, formats=("tar",))
    make_fake_reinforced(str(root / "corpus" / "tar"), str(root / "ds"), [("ta", 16, 70.0)], captioners=("coca",), k=2)
    return root / "ds"


def test_fake_reinforce_goes_through_the_commit_path_and_validates(fake_ds):
    assert assert_schema_valid(str(fake_ds)) == 3
    rep = validate_dataset(str(fake_ds))
    assert rep.ok, rep.render()
    assert rep.shards == 3 and rep.samples == 18
    assert (fake_ds / "README.md").read_text().count("shards/*.parquet") == 1  # the dataset card


def test_markers_of_a_real_job_match_the_schema(tmp_path, tiny_ensemble):
    """The tiny ensemble, --local: per-stage times are in every marker and summed in the manifest."""
    cfg = _tiny_job(tmp_path, tiny_ensemble, per_shard=3, n_aug=2, k=2)
    assert dr(["reinforce", "--config", str(cfg), "--local"]) == 0
    assert assert_schema_valid(str(tmp_path / "ds")) == 2
    ds = ReinforcedDataset(str(tmp_path / "ds"))
    for m in ds.markers().values():
        assert {
            "read",
            "decode_augment",
            "write",
            "commit",
            "wait_input",
            "caption:tiny-coca",
            "teacher:tiny-vit-a:image",
            "teacher:tiny-vit-a:text",
        } <= set(m.stage_s), m.stage_s
        assert m.captions_resampled.keys() == {"tiny-coca"} and m.host and m.pid
        assert m.started_at <= m.finished_at
    man = ds.folder.read_json("manifest.json")
    assert man["complete"] and man["stage_s"]["caption:tiny-coca"] > 0


def _calls(plan) -> dict:
    return dict(plan.dataset.folder.calls)


@pytest.mark.parametrize("n", [200, 800])
def test_planning_storage_calls_do_not_grow_with_the_shards(tmp_path, n):
    job = load_job(make_scale_job(str(tmp_path), n, n // 2, after_checkpoint=7))
    plan = plan_job(job, load_ensemble(job.ensemble_path()))
    assert len(plan.skipped) == n // 2 and len(plan.todo) == n - n // 2 and plan.markers_read == 7
    calls = _calls(plan)
    assert calls["list"] == 2  # _markers/ and shards/, once each
    assert calls["read"] == 7 + 2  # the 7 markers after the checkpoint, manifest, dataset.json
    assert calls.get("remove", 0) <= 1 and calls["write"] <= 6


def test_resume_redoes_a_shard_whose_data_file_changed_and_one_committed_by_another_config(tmp_path):
    job = load_job(make_scale_job(str(tmp_path), 40, 20, after_checkpoint=4))
    ds = ReinforcedDataset(job.output.path)
    Path(ds.folder.path_of(ds.data_rel("shard-000003"))).write_bytes(b"replaced")  # in the checkpoint
    other = ds.folder.read_json(ds.marker_rel("shard-000018"))  # after it
    ds.folder.write_json(ds.marker_rel("shard-000018"), {**other, "config_hash": "0123456789abcdef"})
    plan = plan_job(job, load_ensemble(job.ensemble_path()), force=True)
    redo = {u.rsplit("/", 1)[-1][:-4] for u in plan.todo}
    assert {"shard-000003", "shard-000018"} <= redo and len(redo) == 22
    assert not ds.folder.exists(ds.marker_rel("shard-000003")) and not ds.folder.exists(ds.marker_rel("shard-000018"))


def test_a_changed_config_is_refused_naming_the_keys_that_differ(tmp_path):
    job = load_job(make_scale_job(str(tmp_path), 10, 5, after_checkpoint=0))
    cfg = Path(tmp_path / "job.yaml")
    import yaml

    d = yaml.safe_load(cfg.read_text())
    d["aug"]["n_aug"] = 3
    d["seed"] = 7
    cfg.write_text(yaml.safe_dump(d))
    job = load_job(cfg)
    with pytest.raises(Exception) as e:
        plan_job(job, load_ensemble(job.ensemble_path()))
    assert "aug.n_aug" in str(e.value) and "seed" in str(e.value) and "--force" in str(e.value)


class _Interrupting(StandInProcessor):
    """Commits 5 shards, then the driver gets Ctrl-C."""

    done = 0

    def process(self, url, dataset, config_hash):
        if _Interrupting.done == 5:
            raise KeyboardInterrupt
        _Interrupting.done += 1
        return super().process(url, dataset, config_hash)


def test_an_interrupted_driver_leaves_every_committed_shard_in_the_manifest(tmp_path):
    os.environ["DR_STANDIN_MS"] = "0"
    inputs = Folder(str(tmp_path / "in"))
    for n in shard_names(12):
        inputs.write_bytes(f"{n}.tar", b"")
    job = load_job(
        write_job_file(str(tmp_path / "job.yaml"), inputs.root, str(tmp_path / "out"), manifest_every_s=0.001)
    )
    ens = load_ensemble(job.ensemble_path())
    with pytest.raises(KeyboardInterrupt):
        run_job(job, ens, executor="local", processor=_Interrupting)
    man = ReinforcedDataset(job.output.path).read_manifest()
    assert sorted(man.shards) == shard_names(12)[:5] and not man.complete
    rerun = run_job(job, ens, executor="local", processor=StandInProcessor)  # resumes from it
    assert sorted(rerun.skipped) == shard_names(12)[:5] and len(rerun.committed) == 7
    assert ReinforcedDataset(job.output.path).read_manifest().complete


def _status_checks(root: str, so: dict | None) -> None:
    st = job_status(root, so, now=2e9)
    assert st.complete and st.shards_committed == st.shards_total == 30 and st.eta_s is None
    ds = ReinforcedDataset(root, so)
    # "running": a checkpoint that knows 20 shards, 4 more committed since, 6 to go
    man = ds.read_manifest()
    names = sorted(ds.listing().markers)
    for n in names[24:]:
        ds.uncommit(n)
    partial = Manifest(
        man.config_hash,
        man.teachers,
        man.captioners,
        30,
        shards={n: man.shards[n] for n in names[:20] if n in man.shards},
    )
    assert len(partial.shards) == 20
    ds.write_manifest(partial)
    st = job_status(root, so, now=2e9)
    assert not st.complete and (st.shards_committed, st.shards_total) == (24, 30)
    assert st.markers_after_checkpoint == 4
    assert st.shards_per_hour > 0 and st.eta_s is not None and st.eta_s > 0
    assert "24/30 committed" in st.render() and not st.finished and "running" in st.render()
    partial.finished_at = 1.0e9  # the driver's final write, then no commit since: finished, incomplete
    for n in names[20:24]:
        ds.uncommit(n)
    ds.write_manifest(partial)
    st = job_status(root, so, now=2e9)
    assert st.finished and not st.complete and "finished, 10 shard(s) not committed" in st.render()


def test_dr_status_finished_and_running_local(tmp_path, capsys):
    job = load_job(make_scale_job(str(tmp_path), 30, 30, after_checkpoint=3))
    root = job.output.path
    assert dr(["status", root, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["complete"] and out["shards_committed"] == 30 and out["markers_after_checkpoint"] == 3
    _status_checks(root, None)


def test_dr_status_on_moto_s3(tmp_path, s3_bucket):
    bucket, so = s3_bucket
    job = load_job(make_scale_job(str(tmp_path), 30, 30, after_checkpoint=3))
    fs = fsspec.filesystem("s3", **so)
    fs.put(job.output.path + "/", f"{bucket}/ds/", recursive=True)
    _status_checks(f"s3://{bucket}/ds", so)


def test_dr_status_on_a_path_that_is_not_a_dataset(tmp_path, capsys):
    assert dr(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not a dr_pipeline dataset" in err and len(err.strip().splitlines()) == 1


def test_a_full_disk_ends_in_one_line_per_shard_and_a_summary(tmp_path, tiny_ensemble, monkeypatch, capsys):
    """ENOSPC while committing: each shard fails at once (permanent), one line each, exit 1, and the
    summary says a rerun resumes; when even the manifest cannot be written: one line, exit 3, the
    traceback in a log file only."""
    import errno

    cfg = _tiny_job(tmp_path, tiny_ensemble, per_shard=2, n_aug=1, k=1)
    real = Folder.write_bytes

    def full(self, rel, data):
        if rel.startswith("_markers/shard") or (rel == "manifest.json" and full.manifest):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, rel, data)

    full.manifest = False
    monkeypatch.setattr(Folder, "write_bytes", full)
    monkeypatch.setenv("DR_LOG_DIR", str(tmp_path / "logs"))
    assert dr(["reinforce", "--config", str(cfg), "--local"]) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 2 and all("permanent error, not retried" in f and "No space left" in f for f in failed)
    assert "rerun the same command" in err and "Traceback" not in err
    full.manifest = True
    assert dr(["reinforce", "--config", str(cfg), "--local"]) == 3
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert "disk is full" in line and "rerun the same command to resume" in line and "Traceback" not in err
    [log] = (tmp_path / "logs").glob("dr-*.log")
    assert "Traceback" in log.read_text()


def test_dr_train_on_an_s3_dataset_made_with_secrets_uses_the_callers_credentials(
    fake_ds, tmp_path, s3_bucket, monkeypatch
):
    """The reinforcement job had credentials in storage_options: job.yaml holds '***' for them.
    Training from that dataset on S3 reads the base shards named in job.yaml with the caller's
    options (and the environment's credentials), and no '***' ever reaches fsspec."""
    import yaml

    from dr_pipeline.train.config import DataConfig, OptimConfig, StudentConfig, TrainConfig
    from dr_pipeline.train.loop import train

    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    fs.put(str(fake_ds.parent / "corpus" / "tar") + "/", f"{bucket}/corpus/", recursive=True)
    fs.put(str(fake_ds) + "/", f"{bucket}/ds/", recursive=True)
    job = yaml.safe_load(fs.cat_file(f"{bucket}/ds/job.yaml"))
    job["input"] = {"urls": f"s3://{bucket}/corpus", "storage_options": {"key": "***", "secret": "***", **so}}
    fs.pipe_file(f"{bucket}/ds/job.yaml", yaml.safe_dump(job).encode())
    seen: list[dict] = []
    real = fsspec.core.url_to_fs

    def spy(url, **kw):
        seen.append(kw)
        return real(url, **kw)

    monkeypatch.setattr(fsspec.core, "url_to_fs", spy)
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"),
        steps=2,
        batch_size=4,
        log_every=1,
        checkpoint_every=2,
        student=StudentConfig(arch="tiny", image_size=32),
        data=DataConfig(reinforced=f"s3://{bucket}/ds", storage_options=so, num_workers=0),
        optim=OptimConfig(warmup_steps=1),
    )
    run = train(cfg)
    assert run.step == 2 and len(run.losses) == 2
    assert seen and not any("***" in json.dumps(kw, default=str) for kw in seen)


def test_the_dataset_card_lets_hugging_face_datasets_load_the_root(fake_ds, monkeypatch):
    """Needs `datasets`, which the test extra cannot hold: every release that fits fsspec 2026.9
    (s3fs) wants huggingface-hub >= 1, and transformers 4.56 (open_clip's CoCa) wants < 1. Run it
    with `pip install datasets` in a separate venv; the card's YAML is checked below regardless."""
    import yaml

    card = (fake_ds / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["configs"][0]["data_files"][0]["path"] == "shards/*.parquet"
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    d = datasets.load_dataset(str(fake_ds), split="train")
    assert d.num_rows == 18 and "key" in d.column_names and "aug_params" in d.column_names


def test_a_refused_checkpoint_ends_in_one_line(tmp_path, capsys, monkeypatch):
    """A checkpoint holding a pickled object (not tensors and plain dicts) is refused by the safe
    loader: one `error:` line, exit 3, the traceback only in the log file; the payload never runs."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "dr_pipeline.train.checkpoint/1", "x": Payload()}))
    monkeypatch.setenv("DR_LOG_DIR", str(tmp_path / "logs"))
    assert dr(["eval", "--checkpoint", str(evil), "--data", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "ran").exists()
    assert "Traceback" in next((tmp_path / "logs").glob("dr-*.log")).read_text()


def test_one_retry_budget_for_object_stores(tmp_path):
    """s3fs's own retry loop and botocore's retries are off unless the user set them: the
    pipeline's retry.py is the one layer (io_attempts calls, not io_attempts x 5 x 5)."""
    from dr_pipeline.storage.folder import single_retry_budget

    so = single_retry_budget("s3://bucket/x", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}})
    assert so["config_kwargs"]["retries"]["max_attempts"] == 1
    assert Folder("s3://bucket/x", so).fs.retries == 1
    mine = single_retry_budget("s3://bucket/x", {"config_kwargs": {"retries": {"max_attempts": 7}}})
    assert mine["config_kwargs"]["retries"]["max_attempts"] == 7  # the user's choice stands
    assert single_retry_budget(str(tmp_path), {"a": 1}) == {"a": 1}  # local: untouched


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _stats(i: int, reasons: dict) -> ShardStats:
    return ShardStats(
        shard=f"s{i}",
        input_url="u",
        config_hash="h",
        n_read=10,
        n_written=10 - sum(reasons.values()),
        n_rejected=sum(reasons.values()),
        rejected_by_reason=reasons,
        stage_s={"read": 5.0, "caption:coca": 3.0, "teacher:a:image": 1.0},
    )


def test_the_console_is_a_tqdm_bar_on_a_terminal_and_plain_lines_in_a_log():
    tty = _Tty()
    p = Progress(3, stream=tty)
    for i in range(3):
        p.update(_stats(i, {"no_caption": 1}))
    p.close()
    out = tty.getvalue()
    assert "\r" in out and "3/3" in out and "reinforce" in out  # a redrawn tqdm bar
    assert "rejected 3 (no_caption 3)" in out and "caption:coca 75% teacher:a:image 25%" in out
    log = io.StringIO()
    p = Progress(3, stream=log, every_s=3600)
    for i in range(3):
        p.update(_stats(i, {"too_small": 2}))
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[3/3 shards] 24 samples, ETA 0s")  # throttled, final line
    assert "samples/s" in lines[0] and "rejected 6 (too_small 6)" in lines[0] and "\r" not in log.getvalue()
