"""dr train / dr eval: loss goes down, exact resume, DDP on two gloo ranks, configs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from dr_pipeline.config import AugSpec, ConfigError
from dr_pipeline.corpus.synthetic import make_corpus
from dr_pipeline.train.checkpoint import load_checkpoint, resolve
from dr_pipeline.train.config import DataConfig, OptimConfig, StudentConfig, TrainConfig, load_train_config
from dr_pipeline.train.evaluate import eval_main
from dr_pipeline.train.fake_reinforce import make_fake_reinforced
from dr_pipeline.train.loop import lr_at, train, train_main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small reinforced dataset in the project's layout: 3 shards x 8 samples, two teachers."""
    root = tmp_path_factory.mktemp("train-loop")
    make_corpus(str(root / "corpus"), n_shards=3, per_shard=8, seed=0, formats=("tar",))
    make_fake_reinforced(
        str(root / "corpus" / "tar"),
        str(root / "ds"),
        [("ta", 16, 70.0), ("tb", 24, 60.0)],
        captioners=("coca",),
        k=2,
        aug=AugSpec(n_aug=2, size=64),
        seed=1,
    )
    return root


def _cfg(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out),
        steps=6,
        batch_size=4,
        seed=0,
        checkpoint_every=3,
        log_every=1,
        student=StudentConfig(arch="tiny", image_size=32),
        data=DataConfig(reinforced=str(dataset / "ds"), num_workers=0),
        optim=OptimConfig(lr=2e-3, min_lr=1e-5, warmup_steps=2, weight_decay=0.1, ema_decay=0.9),
    )
    base.update(kw)
    return TrainConfig(**base)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_resume_after_k_steps_reproduces_the_uninterrupted_run(dataset, tmp_path):
    full = train(_cfg(dataset, tmp_path / "a"))
    assert full.step == 6 and len(full.losses) == 6

    cfg = _cfg(dataset, tmp_path / "b")
    first = train(cfg, stop_after=3)  # "preempted" after the step-3 checkpoint
    assert first.step == 3
    rest = train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=2)), resume="latest")
    assert rest.step == 6
    assert first.losses + rest.losses == full.losses  # bit-identical steps
    a = load_checkpoint(resolve(str(tmp_path / "a")))
    b = load_checkpoint(resolve(str(tmp_path / "b")))
    for part in ("model", "ema", "data"):
        _assert_same_state(a[part], b[part])
    _assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_fresh_augmentation_run_trains_without_teachers_and_resumes_exactly(dataset, tmp_path):
    """data.augmentation: fresh (a CLIP baseline: λ = 0, new views every visit) through the
    Trainer: no teacher embedding reaches the loss, and a resumed run is bit-exact."""
    from dr_pipeline.train.config import LossConfig

    kw = dict(
        data=DataConfig(reinforced=str(dataset / "ds"), num_workers=0, augmentation="fresh"),
        loss=LossConfig(lam=0.0, syn_weight=1.0),
        steps=4,
        checkpoint_every=2,
    )
    full = train(_cfg(dataset, tmp_path / "a", **kw))
    assert full.step == 4 and all(math.isfinite(x) for x in full.losses)
    cfg = _cfg(dataset, tmp_path / "b", **kw)
    first = train(cfg, stop_after=2)
    rest = train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=2)), resume="latest")
    assert first.losses + rest.losses == full.losses
    _assert_same_state(
        load_checkpoint(resolve(str(tmp_path / "a")))["model"], load_checkpoint(resolve(str(tmp_path / "b")))["model"]
    )
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(not any(k.startswith("distill_") and r[k] for k in r) for r in rows)
    with pytest.raises(ConfigError, match="fresh views have no teacher embeddings"):
        _cfg(dataset, tmp_path / "c", data=kw["data"])  # loss.lam defaults to 1: KD + fresh


def _dr(*args: str) -> int:
    """``dr ...`` through the CLI when it has the sub-command, else the function it wires."""
    from dr_pipeline import cli

    sub = cli.build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    if args[0] in sub:
        return cli.main(list(args))
    opts = dict(zip(args[1::2], args[2::2]))
    if args[0] == "train":
        return train_main(opts["--config"], opts.get("--resume"))
    return eval_main(opts["--checkpoint"], opts["--data"], opts.get("--out"))


def _plain(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool))


def test_dr_train_reduces_the_loss_and_dr_eval_loads_its_checkpoint(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    config = {
        "out_dir": str(out),
        "steps": 24,
        "batch_size": 8,
        "seed": 0,
        "log_every": 1,
        "checkpoint_every": 8,
        "keep_checkpoints": 2,
        "student": {"arch": "tiny", "image_size": 32},
        "data": {"reinforced": str(dataset / "ds"), "exclude_shards": ["shard-00002"], "num_workers": 0},
        "loss": {"lam": 0.5, "gt_weight": 1.0, "syn_weight": 1.0},
        "optim": {"lr": 3e-3, "min_lr": 1e-5, "warmup_steps": 3, "weight_decay": 0.1},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert _dr("train", "--config", str(path)) == 0

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert all(r["contrastive_loss"] + r["distill_loss"] == pytest.approx(r["loss"]) for r in rows)
    assert rows[0]["lr"] < rows[2]["lr"] and rows[-1]["lr"] < rows[10]["lr"]  # warmup, then decay
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step-00000016.pt", "step-00000024.pt"]
    raw = torch.load(out / "checkpoints" / "step-00000024.pt", weights_only=True)  # nothing pickled
    assert _plain(raw) and raw["step"] == 24

    report = tmp_path / "eval.json"
    assert (
        _dr(
            "eval",
            "--checkpoint",
            str(out),
            "--data",
            str(dataset / "corpus" / "tar" / "shard-00002.tar"),
            "--out",
            str(report),
        )
        == 0
    )
    res = json.loads(report.read_text())
    assert res["step"] == 24 and res["retrieval"]["n"] == 8
    for k in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5"):
        assert 0.0 <= res["retrieval"][k] <= 1.0
    assert res["retrieval"]["image_to_text_R@5"] >= res["retrieval"]["image_to_text_R@1"]
    assert set(res["zeroshot"]) <= {"shape", "colour"} and res["zeroshot"]
    assert "R@1" in capsys.readouterr().out

    # a labelled image folder: DATA/<class>/<image>
    folder = tmp_path / "folder"
    for colour in ["red", "blue", "green"]:
        (folder / colour).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40 + 8 * i, 48), colour).save(folder / colour / f"{i}.png")
    assert (
        _dr(
            "eval",
            "--checkpoint",
            str(out / "checkpoints" / "step-00000024.pt"),
            "--data",
            str(folder),
            "--out",
            str(report),
        )
        == 0
    )
    z = json.loads(report.read_text())["zeroshot"]["folder"]
    assert (z["n"], z["n_classes"], z["chance"]) == (6, 3, pytest.approx(1 / 3)) and 0 <= z["top1"] <= 1


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    o = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, o, 100) == pytest.approx(1e-4) and lr_at(9, o, 100) == pytest.approx(1e-3)
    assert lr_at(10, o, 100) == pytest.approx(1e-3)
    assert lr_at(55, o, 100) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, o, 100) == pytest.approx(1e-5)
    decay = [lr_at(s, o, 100) for s in range(10, 101)]
    assert decay == sorted(decay, reverse=True)


def test_train_configs_in_jobs_load_and_typos_are_refused(tmp_path):
    paths = sorted((REPO / "jobs" / "configs").glob("train-*.yaml"))
    assert {p.name for p in paths} >= {"train-tiny.yaml", "train-mci0-dfndr.yaml"}
    for p in paths:
        load_train_config(p)
    dfndr = load_train_config(REPO / "jobs" / "configs" / "train-mci0-dfndr.yaml")
    assert (dfndr.optim.betas, dfndr.optim.weight_decay, dfndr.optim.ema_decay) == ((0.9, 0.95), 0.2, 0.9995)
    assert [t.logit_scale for t in dfndr.data.foreign_teachers] == [70.0, 60.0] and dfndr.loss.lam == 1.0
    assert (dfndr.data.syn_key_regex, dfndr.loss.kd_form) == ("^syn_text_dfn_mscoco38k$", "apple")
    bad = yaml.safe_load((REPO / "jobs" / "configs" / "train-tiny.yaml").read_text())
    bad["optim"]["warmup_step"] = 5
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="did you mean 'warmup_steps'"):
        load_train_config(tmp_path / "bad.yaml")


def test_resume_from_a_missing_checkpoint_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(_cfg(dataset, tmp_path / "c"), resume=str(tmp_path / "nowhere"))


def test_run_directory_on_s3_checkpoints_resumes_and_evaluates(dataset, tmp_path, s3_bucket):
    bucket, _ = s3_bucket
    out = f"s3://{bucket}/runs/tiny"
    cfg = _cfg(dataset, tmp_path, out_dir=out, steps=4, checkpoint_every=2, keep_checkpoints=1)
    first = train(cfg, stop_after=2)
    rest = train(cfg, resume="latest")
    assert rest.step == 4 and first.losses + rest.losses == train(_cfg(dataset, tmp_path / "local", steps=4)).losses
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/tiny/checkpoints"))
    assert names == ["latest.json", "step-00000004.pt"]  # keep_checkpoints=1 pruned step 2
    rows = fs.cat_file(f"{bucket}/runs/tiny/metrics.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
    assert fs.cat_file(f"{bucket}/runs/tiny/curve.png")[:4] == b"\x89PNG"
    assert eval_main(out, str(dataset / "corpus" / "tar" / "shard-00002.tar"), str(tmp_path / "e.json")) == 0


# --------------------------------------------------------------------------- DDP, two gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, cfg: TrainConfig, resume: str | None, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from dr_pipeline.train import loop

    captured = {}
    orig = loop.Trainer.run

    def run(self, stop_after=None):
        res = orig(self, stop_after)
        captured.update({k: v.detach().clone() for k, v in self.student.named_parameters()})
        return res

    loop.Trainer.run = run
    res = train(cfg, resume=resume)
    torch.save({"params": captured, "losses": torch.tensor(res.losses)}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.timeout(240)
def test_ddp_on_two_gloo_ranks_keeps_replicas_equal_and_resumes_per_rank(dataset, tmp_path):
    import torch.multiprocessing as mp

    def run(c: TrainConfig, resume: str | None) -> tuple[dict, dict]:
        mp.start_processes(_ddp_rank, args=(2, _free_port(), c, resume, str(tmp_path)), nprocs=2, start_method="fork")
        r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
        _assert_same_state(r0["params"], r1["params"])  # DDP replicas stay identical
        # (BatchNorm running statistics are per rank: DDP broadcasts rank 0's before each forward)
        assert torch.equal(r0["losses"], r1["losses"])  # the global loss, on both ranks
        return r0, load_checkpoint(resolve(c.out_dir))

    cfg = _cfg(
        dataset, tmp_path / "ddp", steps=4, checkpoint_every=2, batch_size=3, optim=OptimConfig(lr=2e-3, warmup_steps=1)
    )
    full, _ = run(dataclasses.replace(cfg, out_dir=str(tmp_path / "full")), None)
    _, ck = run(dataclasses.replace(cfg, steps=2), None)
    assert ck["step"] == 2 and ck["data"] == {"world": 2, "states": [[0, 0, 6], [0, 0, 6]]}
    resumed, ck = run(cfg, "latest")
    # 3 shards of 8 on 2 ranks: rank 0 reads two shards, rank 1 one; 4 steps x 3 samples = 12 each
    assert ck["step"] == 4 and ck["data"] == {"world": 2, "states": [[0, 1, 4], [1, 0, 4]]}
    assert torch.equal(resumed["losses"], full["losses"][2:])
    _assert_same_state(full["params"], resumed["params"])  # resumed DDP run == uninterrupted


# --------------------------------------------------------------------------- parity with Apple's trainer


def test_gradient_accumulation_equals_one_larger_batch(dataset, tmp_path):
    """accum_steps=2 x 4 samples: the loss over all 8 and its gradient, as one batch of 8."""
    from dr_pipeline.train.data import TrainStream
    from dr_pipeline.train.distributed import setup
    from dr_pipeline.train.loop import Trainer

    env = setup("cpu")
    grads, losses = [], []
    for accum, b in ((1, 8), (2, 4)):
        cfg = _cfg(
            dataset,
            tmp_path / f"accum{accum}",
            batch_size=b,
            accum_steps=accum,
            loss=dataclasses.replace(_cfg(dataset, tmp_path).loss, lam=0.5),
        )
        tr = Trainer(cfg, env)
        tr.student.eval()  # BatchNorm statistics fixed: micro-batches == one batch
        stream = iter(TrainStream(tr.plan, cfg.data, cfg.seed, b, tr.spec.image_size, tr.spec.context_length))
        batches = [next(stream)[0] for _ in range(accum)]
        parts = tr.train_step(batches[0] if accum == 1 else batches)
        losses.append(parts["loss"].item())
        grads.append({n: p.grad.clone() for n, p in tr.student.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and "logit_scale" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)

    res = train(_cfg(dataset, tmp_path / "run", steps=3, accum_steps=2, checkpoint_every=10))
    assert res.step == 3 and res.samples == 3 * 2 * 4
    with pytest.raises(ConfigError, match="accum_steps"):
        _cfg(dataset, tmp_path, accum_steps=0)


def test_open_clip_student_trains_with_apple_options_and_dr_eval_loads_it(dataset, tmp_path):
    import open_clip

    from dr_pipeline.train.config import LossConfig
    from dr_pipeline.train.distributed import setup
    from dr_pipeline.train.loop import Trainer

    open_clip.add_model_config(REPO / "teachers" / "models")
    data = DataConfig(reinforced=str(dataset / "ds"), num_workers=0, mix_synthetic_ratio=0.5, sample_sequential=True)
    cfg = _cfg(
        dataset,
        tmp_path / "oc",
        steps=4,
        data=data,
        student=StudentConfig(arch="dr-tiny-vit-a"),
        loss=LossConfig(lam=0.75, kd_form="apple"),
    )
    assert Trainer(cfg, setup("cpu")).loss_fn.kinds() == ["gt"]  # mixing: one caption term only
    res = train(dataclasses.replace(cfg, student=StudentConfig(arch="dr-tiny-vit-a", grad_checkpointing=True)))
    assert res.step == 4 and all(x == x for x in res.losses)
    ck = load_checkpoint(resolve(str(tmp_path / "oc")))
    assert ck["student"]["open_clip_model"] == "dr-tiny-vit-a" and ck["config"]["loss"]["kd_form"] == "apple"
    from dr_pipeline.train.evaluate import evaluate

    out = evaluate(str(tmp_path / "oc"), str(dataset / "corpus" / "tar" / "shard-00002.tar"), device="cpu")
    assert out["arch"] == "dr-tiny-vit-a" and out["retrieval"]["n"] == 8


def test_tensorboard_logging_and_zero_shot_eval_every_k_steps(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dr_pipeline.train.config import EvalConfig

    folder = tmp_path / "labelled"
    for colour in ("red", "blue"):
        (folder / colour).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40 + 8 * i, 48), colour).save(folder / colour / f"{i}.png")
    out = tmp_path / "tb"
    res = train(_cfg(dataset, out, steps=4, log_every=1, tensorboard=True, eval=EvalConfig(data=str(folder), every=2)))
    assert res.step == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/folder/top1" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["eval/folder/top1"] <= 1 for r in evals)
    assert res.evals == evals  # the run's eval rows come back with its result too
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"loss", "lr", "eval/folder/top1"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/folder/top1")] == [2, 4]
    assert (out / "curve.png").exists()


def test_wandb_without_the_package_is_a_clear_error(dataset, tmp_path):
    from dr_pipeline.storage.folder import Folder
    from dr_pipeline.train.loop import _open_loggers

    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="wandb"):
        _open_loggers(_cfg(dataset, tmp_path / "w", wandb_project="p"), Folder(str(tmp_path / "w")))
