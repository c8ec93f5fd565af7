"""`make reproduce` at toy scale: bootstrap -> reinforce -> train plain / reinforced -> eval -> results.

The real run (jobs/configs/reproduce.yaml, ~20 min) is far too long for CI; this one uses a few
images and steps and asserts the plumbing: every artifact is written, and the reinforced
student learns from the teacher embeddings *stored* in the Parquet shards (no teacher runs
while students train or are evaluated).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ENSEMBLE = REPO / "teachers" / "synthetic.yaml"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from dr_pipeline.bootstrap import BootstrapConfig, bootstrap
    from dr_pipeline.reproduce import CorpusConfig, ReinforceConfig, ReproduceConfig, TrainRuns, reproduce
    from dr_pipeline.train.config import StudentConfig

    root = tmp_path_factory.mktemp("reproduce")
    bootstrap(
        str(ENSEMBLE),
        BootstrapConfig(n_train=32, per_shard=16, clip_steps=3, coca_steps=3, batch_size=16, jobs=1),
        out_dir=str(root / "teachers"),
        evaluate=False,
    )
    cfg = ReproduceConfig(
        out_dir=str(root / "out"),
        results_dir=str(root / "results"),
        seed=0,
        corpus=CorpusConfig(web_shards=2, web_per_shard=12, test_shards=1, test_per_shard=8, zeroshot_per_class=1),
        reinforce=ReinforceConfig(
            teachers=str(root / "teachers" / "synthetic.yaml"),
            n_aug=3,
            k=2,
            aug_size=64,
            executor="local",
            batch_size=8,
            num_cpus=1,
        ),
        train=TrainRuns(
            steps=4,
            batch_size=8,
            eval_every=2,
            seeds=(0, 1),
            ablation_seeds=(0,),
            jobs=1,
            student=StudentConfig(arch="tiny", image_size=32, context_length=32),
        ),
    )
    return cfg, reproduce(cfg)


def test_every_artifact_is_written(toy):
    cfg, res = toy
    out, results = Path(cfg.out_dir), Path(cfg.results_dir)
    assert sorted(p.name for p in (out / "dataset" / "shards").glob("*.parquet")) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    png = (results / "accuracy_vs_steps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    on_disk = json.loads((results / "results.json").read_text())
    assert on_disk["analysis"] == json.loads(json.dumps(res["analysis"]))
    md = (results / "results.md").read_text()
    assert "Steps-to-accuracy ratio" in md and all(f"| {v} |" in md for v in ("plain", "kd", "syn", "full"))
    # 2 seeds for plain and full, 1 for each ablation, one plain run of 3 x 4 steps; evaluations every 2 steps
    assert sorted((r["variant"], r["seed"], r["steps"]) for r in res["runs"]) == [
        ("full", 0, 4),
        ("full", 1, 4),
        ("kd", 0, 4),
        ("plain", 0, 4),
        ("plain", 0, 12),
        ("plain", 1, 4),
        ("syn", 0, 4),
    ]
    for r in res["runs"]:
        assert [row["step"] for row in r["curve"]] == list(range(0, r["steps"] + 1, 2))
        assert all(0.0 <= row["top1"] <= 1.0 and 0.0 <= row["i2t_R@1"] <= 1.0 for row in r["curve"])
        assert Path(r["checkpoint"]).is_file()
    rows = res["analysis"]["variants"]
    assert set(rows) == {"plain", "kd", "syn", "full"} and rows["full"]["seeds"] == [0, 1]
    assert {n: r["augmentation"] for n, r in rows.items()} == {
        "plain": "fresh",
        "kd": "stored",
        "syn": "stored",
        "full": "stored",
    }
    assert "| plain | 0 | 1 / 0 | fresh |" in md
    assert len(rows["plain"]["ratio_per_seed"]) == 2 and all(0 <= r <= 1 for r in rows["plain"]["ratio_per_seed"])
    h = res["analysis"]["headline"]
    assert len(h["ratio_per_seed"]) + h["not_reached"] == 2
    vb = h["vs_best"]  # the long plain run: its best, and the reinforced runs against it
    assert vb["plain_steps"] == 12 and len(vb["target_steps_to_plain_best"]) == 2
    assert vb["plain_best_top1"] == max(r["top1"] for r in smoothed_long(res, cfg))
    assert h["cost"]["reinforce_core_s"] > 0 and "Against plain's best" in md
    # the same seed trains the same student: two plain seeds differ, the run is reproducible below
    plain = {r["seed"]: r["curve"] for r in res["runs"] if r["variant"] == "plain" and r["steps"] == 4}
    assert plain[0] != plain[1]


def smoothed_long(res, cfg):
    from dr_pipeline.reproduce import smoothed

    (long,) = [r for r in res["runs"] if r["steps"] == 12]
    return smoothed(long["curve"], cfg.smooth_evals)


def _stored_rows(dataset: Path) -> dict[str, dict[str, np.ndarray]]:
    """key -> {teacher: [n_aug, dim] float32 image embeddings}, read straight from the Parquet."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for f in sorted((dataset / "shards").glob("*.parquet")):
        t = pq.read_table(f)
        for name in t.column_names:
            if name.startswith("emb__") and "__image__" in name:
                teacher = name.split("__")[1]
                n_aug, dim = map(int, name.rsplit("_", 1)[1].split("x"))
                raw = np.stack([np.asarray(v, np.uint16) for v in t.column(name).to_pylist()])
                vals = torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16).float().numpy()
                for key, row in zip(t.column("key").to_pylist(), vals.reshape(len(raw), n_aug, dim)):
                    out.setdefault(key, {})[teacher] = row
    return out


def test_runs_are_dr_train_runs_through_trainer_run(toy, monkeypatch):
    """Each run is ``Trainer.run()`` of ``dr train`` (its loader, schedule and periodic eval):
    the written train_config.yaml is the run's config, the curve is the trainer's eval rows
    (also in metrics.jsonl), and a rerun of the seed gives the same curve."""
    from dr_pipeline import reproduce as rp
    from dr_pipeline.config import from_dict, strip_redacted
    from dr_pipeline.train import loop
    from dr_pipeline.train.config import TrainConfig
    from dr_pipeline.train.data import TrainStream

    cfg, res = toy
    calls, streams, teachers_seen = [], [], []
    real_run, real_iter = loop.Trainer.run, TrainStream.__iter__

    def spy_run(self, *a, **k):
        calls.append(self.cfg)
        return real_run(self, *a, **k)

    def spy_iter(self):
        streams.append(self)
        for batch, state in real_iter(self):
            teachers_seen.append(batch["teachers"])
            yield batch, state

    monkeypatch.setattr(loop.Trainer, "run", spy_run)
    monkeypatch.setattr(TrainStream, "__iter__", spy_iter)
    plain = next(v for v in cfg.variants if v.name == "plain")
    lay = rp.Layout(Path(cfg.out_dir))
    again = rp.run_one((cfg, lay, plain, 1, cfg.train.steps))
    tcfg = rp._train_config(cfg, lay, plain, 1)
    assert calls == [tcfg] and len(streams) == 1 and streams[0].cfg.cache_images
    # the plain baseline: fresh online augmentation, so its batches carry no teacher embeddings
    assert tcfg.data.augmentation == "fresh" and streams[0].cfg.augmentation == "fresh"
    assert teachers_seen and all(t == {} for t in teachers_seen)
    written = yaml.safe_load((Path(tcfg.out_dir) / "train_config.yaml").read_text())
    assert written["data"]["augmentation"] == "fresh"
    assert from_dict(TrainConfig, strip_redacted(written), "train_config.yaml") == tcfg
    first = next(r for r in res["runs"] if (r["variant"], r["seed"], r["steps"]) == ("plain", 1, 4))
    assert again["curve"] == first["curve"]
    rows = [json.loads(line) for line in (Path(tcfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/folder/top1" in r]
    assert [r["step"] for r in evals] == [row["step"] for row in again["curve"]] == [0, 2, 4]
    for r, row in zip(evals, again["curve"]):
        assert {name: r[k] for k, name in rp.CURVE_KEYS.items()} == {n: row[n] for n in rp.CURVE_KEYS.values()}
    assert "loss" in again["curve"][-1] and "loss" not in again["curve"][0]


def test_reinforced_student_learns_from_stored_teacher_embeddings(toy, monkeypatch):
    """No teacher or captioner is loaded while a reinforced student trains and is evaluated;
    its batches (the trainer's own loader) carry the stored bf16 embeddings of the
    augmentation whose view it sees; its distillation term is the loss of those stored
    embeddings; the run is a pure function of the seed (same curve as in the full run)."""
    import dr_pipeline.models.captioner as captioner
    import dr_pipeline.models.teachers as teachers
    from dr_pipeline import reproduce as rp

    cfg, res = toy

    def refuse(*a, **k):
        raise AssertionError("a teacher model was loaded during student training")

    monkeypatch.setattr(teachers, "load_teacher", refuse)
    monkeypatch.setattr(captioner, "load_captioner", refuse)
    full = next(v for v in cfg.variants if v.name == "full")
    lay = rp.Layout(Path(cfg.out_dir))
    again = rp.run_one((cfg, lay, full, 0, cfg.train.steps))
    first = next(r for r in res["runs"] if (r["variant"], r["seed"]) == ("full", 0))
    assert again["curve"] == first["curve"]

    from dr_pipeline.train.distributed import setup, teardown
    from dr_pipeline.train.loop import Trainer

    stored = _stored_rows(lay.dataset)
    env = setup("cpu")
    try:
        trainer = Trainer(rp._train_config(cfg, lay, full, 0), env)
        batch, _ = next(iter(trainer.stream))
        assert set(batch["teachers"]) == {"syn-vit-a", "syn-vit-b"}
        assert set(batch["keys"]) <= set(stored)
        for i, key in enumerate(batch["keys"]):
            a = int(batch["aug_index"][i])
            for t in stored[key]:
                assert np.array_equal(batch["teachers"][t][i, 0].numpy(), stored[key][t][a]), (key, t)
        # the distillation part, recomputed from the batch's stored embeddings on the same weights
        with torch.no_grad():
            kinds = trainer.loss_fn.kinds()
            from dr_pipeline.train.loop import KINDS

            text = torch.cat([batch["tokens"][:, KINDS.index(c)] for c in kinds])
            img_f, txt_f, scale = trainer.model(batch["image"], text)
            b = batch["image"].shape[0]
            tch = {t: {"image": v[:, 0], "gt": v[:, 1], "syn": v[:, 2]} for t, v in batch["teachers"].items()}
            ref = trainer.loss_fn(img_f, {c: txt_f[i * b : (i + 1) * b] for i, c in enumerate(kinds)}, scale, tch)
        parts = trainer.train_step(batch)
        kd = [k for k in parts if k.startswith("distill_")]
        assert kd, sorted(parts)
        for k in kd + ["loss"]:
            assert float(parts[k].detach()) == pytest.approx(float(ref[k]), rel=1e-5), k
        assert float(parts["loss"].detach()) > 0
    finally:
        teardown(env)


def test_plain_runs_on_fresh_augmentation_and_reinforced_runs_on_stored_views(tmp_path):
    """The run configs: plain (λ = 0) draws fresh RRC + RandAugment every visit, as standard
    CLIP training; full / kd / syn replay the stored views the teachers embedded. A variant
    asking for distillation on fresh views is refused."""
    from dr_pipeline import reproduce as rp
    from dr_pipeline.config import ConfigError

    for cfg in (rp.ReproduceConfig(), rp.load_reproduce_config(REPO / "jobs" / "configs" / "reproduce.yaml")):
        lay = rp.Layout(tmp_path)
        aug = {v.name: rp._train_config(cfg, lay, v, 0).data.augmentation for v in cfg.variants}
        assert aug == {"plain": "fresh", "kd": "stored", "syn": "stored", "full": "stored"}
        assert all(rp._train_config(cfg, lay, v, 0).loss.lam == 0 for v in cfg.variants if aug[v.name] == "fresh")
    with pytest.raises(ConfigError, match="fresh augmentation has no teacher embeddings"):
        rp.Variant("bad", "KD on fresh views", lam=1.0, augmentation="fresh")
    with pytest.raises(ConfigError, match="augmentation must be stored or fresh"):
        rp.Variant("bad", "typo", lam=0.0, augmentation="online")
