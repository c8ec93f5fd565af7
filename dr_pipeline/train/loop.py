"""``dr train``: the student training loop (single process, torchrun DDP, or Ray Train).

AdamW (β from the config, decoupled weight decay on weights only, as open_clip), linear
warmup then cosine decay to ``min_lr`` (a pure function of the step), gradient clipping,
bf16 autocast on CUDA, optional EMA, checkpoints every ``checkpoint_every`` steps and at the
end. ``resume`` continues exactly: model, optimizer, EMA and every rank's data position come
from the checkpoint, so the resumed run computes the same steps as an uninterrupted one.

Multi-GPU: ``torchrun --nproc-per-node N -m dr_pipeline.train.loop --config C`` (or ``dr
train`` under torchrun), or ``jobs/train_ray.py`` for Ray Train; both give each rank its
process group, and ``batch_size`` is per rank.

``accum_steps`` > 1 is open_clip's ``accum_freq``: the features of all micro-batches are
computed once without gradients, then each micro-batch is recomputed with gradients and the
loss taken over the whole accumulated batch, so the gradient is that of one batch
``accum_steps`` times larger (the logit scale's is counted once, unlike open_clip's).
Optional logging beside metrics.jsonl: TensorBoard event files (``tensorboard: true``) and
Weights & Biases (``wandb_project``); ``eval`` runs ``dr eval``'s zero-shot / retrieval
metrics every ``eval.every`` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml
from torch import nn

from dr_pipeline.config import ConfigError, redact
from dr_pipeline.storage.folder import Folder
from dr_pipeline.train import checkpoint as ckpt
from dr_pipeline.train.coca import CaptionLoss, init_decoder, is_coca
from dr_pipeline.train.config import OptimConfig, TrainConfig, load_train_config
from dr_pipeline.train.data import StreamState, TrainStream
from dr_pipeline.train.distributed import DistEnv, all_gather_ints, mean_across_ranks, setup, teardown
from dr_pipeline.train.loss import KINDS, DistillClipLoss
from dr_pipeline.train.metrics import MetricsLog
from dr_pipeline.train.sources import DataPlan, plan_data
from dr_pipeline.train.students import Student, build_student, init_from, resolve_spec, weights_of

log = logging.getLogger(__name__)


def lr_at(step: int, o: OptimConfig, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` then cosine from ``lr`` to ``min_lr`` at ``total_steps``."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (o.lr - o.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on biases, norms, gains and the logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused kernel (one pass over all tensors, ~8x faster a
    step than the per-tensor loop for a small CPU student) where every parameter allows it."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, fused=fused or None
    )


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


@dataclass
class TrainResult:
    step: int
    checkpoint: str | None
    losses: list[float] = field(default_factory=list)  # per step of this run, this rank's value
    skipped: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    evals: list[dict] = field(default_factory=list)  # the eval rows of this run (``Trainer.evaluate``)


class Trainer:
    """Holds the state of one run; ``run()`` trains until ``cfg.steps`` (or ``stop_after``)."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, resume: str | None = None):
        self.cfg, self.env = cfg, env
        self.out = Folder(cfg.out_dir)
        self.plan: DataPlan = plan_data(cfg.data)
        self.spec = resolve_spec(cfg.student)
        unknown = set(cfg.loss.teacher_logit_scales) - {t.id for t in self.plan.teachers}
        if unknown:
            raise ConfigError(f"loss.teacher_logit_scales names teachers not trained on: {sorted(unknown)}")
        self.scales = {t.id: float(cfg.loss.teacher_logit_scales.get(t.id, t.logit_scale)) for t in self.plan.teachers}
        # mix_synthetic_ratio: one caption per sample, so no separate synthetic-caption term (Apple)
        syn_weight = 0.0 if cfg.data.mix_synthetic_ratio is not None else cfg.loss.syn_weight
        self.loss_fn = DistillClipLoss(
            self.scales, cfg.loss.lam, cfg.loss.gt_weight, syn_weight, cfg.loss.local_loss, cfg.loss.kd_form
        )
        path = ckpt.resolve(resume if resume not in (None, "latest") else cfg.out_dir) if resume else None
        if resume and resume != "latest" and path is None:
            raise ConfigError(f"--resume {resume}: no checkpoint there")
        self.student: Student = build_student(self.spec, seed=cfg.seed)
        self.caption_loss = self._caption_setup(fresh=path is None)
        if path is None and cfg.student.init_from:
            init_from(self.student, cfg.student.init_from, cfg.student.init_keys)
        self.student.to(env.device)
        if cfg.student.grad_checkpointing:
            self.student.set_grad_checkpointing(True)
        self.ema = self._new_ema() if cfg.optim.ema_decay else None
        o = cfg.optim
        self.optimizer = make_optimizer(self.student, o)
        self.step, state = 0, StreamState()
        if path is not None:
            state = self._load(path)
        elif resume == "latest":
            log.info("no checkpoint in %s yet: starting at step 0", cfg.out_dir)
        self.model: nn.Module = self.student
        if env.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.student, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        self.stream = TrainStream(
            self.plan,
            cfg.data,
            cfg.seed,
            cfg.batch_size,
            self.spec.image_size,
            self.spec.context_length,
            env.rank,
            env.world,
            state,
            pin_memory=env.device.type == "cuda",
        )
        self.amp = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        self.metrics = MetricsLog(self.out, self.step if path else None) if env.is_main else None
        if env.is_main:
            self.out.write_bytes("train_config.yaml", yaml.safe_dump(redact(cfg), sort_keys=False).encode())
        self.loggers = _open_loggers(cfg, self.out) if env.is_main else []
        self.eval_data = None
        self.evals: list[dict] = []  # every ``evaluate()`` row, {"step", "eval/<task>/<metric>", ...}
        if cfg.eval is not None and env.is_main:
            from dr_pipeline.train.evaluate import load_eval_data

            self.eval_data = load_eval_data(cfg.eval.data, limit=cfg.eval.limit)
            if not self.eval_data.pairs and not self.eval_data.tasks:
                raise ConfigError(f"eval.data {cfg.eval.data}: no labelled images and no image-caption pairs")

    def _caption_setup(self, fresh: bool) -> CaptionLoss | None:
        """``loss.caption_weight``: the CoCa caption loss; on a fresh start, the decoder's init
        (seeded from the run's seed) with the columns outside ``loss.caption_vocab`` zeroed."""
        lc = self.cfg.loss
        if not lc.caption_weight:
            return None
        model = weights_of(self.student)
        if not is_coca(model):
            raise ConfigError(f"loss.caption_weight needs a CoCa student (student.arch {self.cfg.student.arch!r})")
        if lc.gt_weight == 0:
            raise ConfigError("loss.caption_weight: the caption loss is on the GT captions, so gt_weight must be > 0")
        n_vocab = model.text_decoder.text_projection.shape[1]
        if lc.caption_vocab is not None and max(lc.caption_vocab) >= n_vocab:
            raise ConfigError(f"loss.caption_vocab: token ids must be < {n_vocab}")
        if fresh:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed + 1)
                vocab = None if lc.caption_vocab is None else torch.tensor(lc.caption_vocab)
                init_decoder(model, vocab)
        return CaptionLoss(n_vocab, lc.caption_vocab)

    def _new_ema(self) -> Student:
        ema = copy.deepcopy(self.student)
        for p in ema.parameters():
            p.requires_grad_(False)
        return ema

    def _load(self, path: str) -> StreamState:
        ck = ckpt.load_checkpoint(path)
        if ck["student"] != self.spec.to_dict():
            raise ConfigError(
                f"{path} holds a different student ({ck['student']['arch']}, "
                f"image {ck['student']['image_size']}) than the config"
            )
        self.student.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(ck["ema"] if "ema" in ck else self.student.state_dict())
        self.step = int(ck["step"])
        data = ck["data"]
        if data["world"] == self.env.world:
            state = StreamState(*data["states"][self.env.rank])
        else:  # positions are per rank: with another world size, continue at the next epoch
            state = StreamState(max(s[0] for s in data["states"]) + 1, 0, 0)
            log.warning(
                "checkpoint from %d rank(s), running %d: data restarts at epoch %d",
                data["world"],
                self.env.world,
                state.epoch,
            )
        if self.env.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return state

    # ------------------------------------------------------------------ one step
    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        dev = self.env.device
        kinds = self.loss_fn.kinds()
        images = batch["image"].to(dev, non_blocking=True)
        tokens = batch["tokens"].to(dev, non_blocking=True)
        text = torch.cat([tokens[:, KINDS.index(c)] for c in kinds])
        teachers = {
            t: {"image": v[:, 0].to(dev), "gt": v[:, 1].to(dev), "syn": v[:, 2].to(dev)}
            for t, v in batch["teachers"].items()
            if t in self.scales
        }
        return images, text, teachers

    def _features(self, images: torch.Tensor, text: torch.Tensor):
        """(image features [b, d], {kind: text features [b, d]}, logit scale); with the caption
        loss also the decoder's hidden states of the GT captions (the first b text rows)."""
        b = images.shape[0]
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = (
                self.model(images, text, caption_rows=b) if self.caption_loss is not None else self.model(images, text)
            )
        img_f, txt_f, scale = out[:3]
        feats = img_f, {c: txt_f[i * b : (i + 1) * b] for i, c in enumerate(self.loss_fn.kinds())}, scale
        return (*feats, out[3]) if self.caption_loss is not None else feats

    def _loss(self, images: torch.Tensor, text: torch.Tensor, teachers: dict) -> dict[str, torch.Tensor]:
        """The loss parts of one (micro-)batch: ``DistillClipLoss``'s, plus the caption loss."""
        feats = self._features(images, text)
        parts = self.loss_fn(*feats[:3], teachers)
        if self.caption_loss is not None:
            with torch.autocast(self.env.device.type, enabled=False):
                labels = text[: images.shape[0], 1:]  # GT tokens: kinds()[0] is "gt"
                cap = self.caption_loss(weights_of(self.student), feats[3].float(), labels)
            parts["caption_loss"] = cap
            parts["loss"] = parts["loss"] + self.cfg.loss.caption_weight * cap
        return parts

    def train_step(self, batch: dict | list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step on a batch, or on a list of micro-batches (gradient accumulation)."""
        micro = [batch] if isinstance(batch, dict) else list(batch)
        inputs = [self._inputs(b) for b in micro]
        self.optimizer.zero_grad(set_to_none=True)
        if len(micro) == 1:
            parts = self._loss(*inputs[0])
            parts["loss"].backward()
        else:
            parts = self._accumulate(inputs)
        if self.cfg.optim.grad_clip:
            parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.student.clamp_logit_scale()
        if self.ema is not None:
            ema_update(self.ema, self.student, self.cfg.optim.ema_decay)
        return parts

    def _accumulate(self, inputs: list) -> dict[str, torch.Tensor]:
        """open_clip's accum_freq: the loss over all micro-batches' features, its gradient taken
        one micro-batch at a time (the others' features cached without gradient)."""
        with torch.no_grad():
            cached = [self._features(images, text) for images, text, _ in inputs]
        teachers = {t: {k: torch.cat([inp[2][t][k] for inp in inputs]) for k in inputs[0][2][t]} for t in inputs[0][2]}
        kinds = self.loss_fn.kinds()
        last = len(inputs) - 1
        for i, (images, text, _) in enumerate(inputs):
            sync = self.model.no_sync() if i < last and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            with sync:
                img_f, txt_f, scale = self._features(images, text)
                feats = [img_f if j == i else c[0] for j, c in enumerate(cached)]
                texts = {c: torch.cat([txt_f[c] if j == i else x[1][c] for j, x in enumerate(cached)]) for c in kinds}
                # the logit scale's gradient once (last micro-batch), not once per micro-batch
                parts = self.loss_fn(torch.cat(feats), texts, scale if i == last else scale.detach(), teachers)
                parts["loss"].backward()
        return parts

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after: int | None = None) -> TrainResult:
        cfg, env = self.cfg, self.env
        result = TrainResult(step=self.step, checkpoint=None)
        last_ckpt_step = self.step
        t_log, samples_log = time.perf_counter(), 0
        losses: list[torch.Tensor] = []  # read back at log steps only: no GPU sync per step
        stream = iter(self.stream)
        start, first_eval = self.step, len(self.evals)
        while self.step < cfg.steps and (stop_after is None or self.step - start < stop_after):
            micro = []
            for _ in range(cfg.accum_steps):
                batch, state = next(stream)
                micro.append(batch)
            lr = lr_at(self.step, cfg.optim, cfg.steps)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            parts = self.train_step(micro[0] if cfg.accum_steps == 1 else micro)
            self.step += 1
            samples_log += cfg.batch_size * cfg.accum_steps * env.world
            losses.append(parts["loss"].detach())
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                result.losses += torch.stack(losses).tolist()
                losses = []
                now = time.perf_counter()
                self._log(parts, lr, state, samples_log / max(now - t_log, 1e-9))
                t_log, samples_log = now, 0
            if cfg.eval is not None and (self.step % cfg.eval.every == 0 or self.step == cfg.steps):
                t_eval = time.perf_counter()
                self.evaluate()
                t_log += time.perf_counter() - t_eval  # samples/s: training time only
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                result.checkpoint = self.save(state)
                last_ckpt_step = self.step
        result.losses += torch.stack(losses).tolist() if losses else []
        if self.metrics is not None:
            self.metrics.flush()
        for lg in self.loggers:
            lg.flush()
        result.step = self.step
        result.evals = self.evals[first_eval:]
        result.skipped = dict(self.stream.skipped)
        result.samples = self.stream.samples
        if result.checkpoint is None and last_ckpt_step == self.step and self.step > 0:
            result.checkpoint = ckpt.resolve(cfg.out_dir)
        return result

    def _log(self, parts: dict[str, torch.Tensor], lr: float, state: StreamState, samples_per_s: float) -> None:
        values = {k: float(v.detach()) for k, v in parts.items()}
        values["skipped"] = float(sum(self.stream.skipped.values()))
        values = mean_across_ranks(values, self.env)  # a collective: every rank logs
        values["skipped"] = round(values["skipped"] * self.env.world)
        if self.metrics is None:
            return
        row = {
            "step": self.step,
            "epoch": state.epoch,
            "lr": lr,
            "logit_scale": float(self.student.logit_scale.detach().exp()),
            "samples_per_s": samples_per_s,
            **values,
        }
        self.metrics.append(row)
        for lg in self.loggers:
            lg.log({k: v for k, v in row.items() if k != "step"}, self.step)
        parts_txt = " ".join(
            f"{k} {values[k]:.4f}" for k in ("contrastive_loss", "distill_loss", "caption_loss") if k in values
        )
        print(
            f"step {self.step}/{self.cfg.steps} | loss {values['loss']:.4f} ({parts_txt}) | lr {lr:.3g} | "
            f"scale {row['logit_scale']:.1f} | {samples_per_s:.1f} samples/s | epoch {state.epoch} | "
            f"skipped {values['skipped']}",
            flush=True,
        )

    def evaluate(self) -> dict | None:
        """``dr eval``'s metrics of the current weights (the EMA's when there is one), main rank
        only; rows ``{"step", "eval/<task>/top1", ...}`` in metrics.jsonl, the loggers and
        ``self.evals``. ``run()`` calls it every ``eval.every`` steps and at the end; call it
        before ``run()`` for the untrained model's row."""
        if self.eval_data is None:
            return None
        from dr_pipeline.train.evaluate import evaluate_model

        model = (self.ema if self.ema is not None else self.student).reparameterize()  # eval-mode copy
        res = evaluate_model(model, self.eval_data)
        flat = {
            f"eval/{task}/{k}": float(v)
            for task, z in res["zeroshot"].items()
            for k, v in z.items()
            if k not in ("n", "n_classes", "chance")
        }
        flat.update({f"eval/retrieval/{k}": float(v) for k, v in res.get("retrieval", {}).items() if k != "n"})
        self.evals.append({"step": self.step, **flat})
        if self.metrics is not None:
            self.metrics.append({"step": self.step, **flat})
        for lg in self.loggers:
            lg.log(flat, self.step)
        print(f"eval step {self.step}: " + " ".join(f"{k} {v:.3f}" for k, v in flat.items()), flush=True)
        return res

    def save(self, state: StreamState) -> str | None:
        states = all_gather_ints(state.as_list(), self.env)  # a collective: every rank calls
        if not self.env.is_main:
            return None
        payload = {
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data": {"world": self.env.world, "states": states},
            "student": self.spec.to_dict(),
            "teachers": [{"id": t.id, "dim": t.dim, "logit_scale": self.scales[t.id]} for t in self.plan.teachers],
            "config": redact(self.cfg),
            "skipped": dict(self.stream.skipped),
        }
        if self.ema is not None:
            payload["ema"] = self.ema.state_dict()
        path = ckpt.save_checkpoint(self.out, self.step, payload, self.cfg.keep_checkpoints)
        if self.metrics is not None:
            self.metrics.flush()
        return path


class _TensorBoard:
    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                f"tensorboard: true needs the tensorboard package (pip install tensorboard): {e}"
            ) from None
        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()


class _WandB:
    def __init__(self, project: str, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("wandb_project is set but wandb is not installed (pip install wandb)") from None
        self.run = wandb.init(project=project, name=name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass


def _open_loggers(cfg: TrainConfig, out) -> list:
    """The optional loggers beside metrics.jsonl (main rank)."""
    loggers: list = []
    if cfg.tensorboard:
        if not out.local:
            raise ConfigError(f"tensorboard: true needs a local out_dir (got {cfg.out_dir})")
        loggers.append(_TensorBoard(out.path_of("tensorboard")))
    if cfg.wandb_project:
        loggers.append(_WandB(cfg.wandb_project, cfg.out_dir.rstrip("/").rsplit("/", 1)[-1], redact(cfg)))
    return loggers


def train(
    cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None, device: torch.device | None = None
) -> TrainResult:
    """Train per ``cfg``. ``resume``: None, "latest" (the run's newest checkpoint, if any) or a
    checkpoint path. ``stop_after``: stop after that many steps of this run (a preemption
    stand-in for tests; no extra checkpoint is written)."""
    env = setup(cfg.device, device)
    try:
        return Trainer(cfg, env, resume).run(stop_after)
    finally:
        teardown(env)


def train_main(config_path: str, resume: str | None = None) -> int:
    """Entry point of ``dr train --config C [--resume latest|PATH]``; returns the exit code."""
    cfg = load_train_config(config_path)
    res = train(cfg, resume)
    if res.checkpoint:
        print(
            f"done: step {res.step}, checkpoint {res.checkpoint}, {res.samples} samples, "
            f"skipped {sum(res.skipped.values())} {res.skipped or ''}".rstrip()
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dr_pipeline.train.loop", description="train a student (torchrun-friendly)"
    )
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return train_main(a.config, a.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
