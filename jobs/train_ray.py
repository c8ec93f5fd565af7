"""Ray Train entrypoint for ``dr train``: one training process per Ray worker (GPU), DDP.

    python jobs/train_ray.py --config jobs/configs/train-mci0-dfndr.yaml --workers 16 --gpu --resume latest
    ray job submit --working-dir . -- python jobs/train_ray.py --config ... --workers 64 --gpu

Ray Train creates the process group (NCCL on GPU, gloo on CPU) and places the workers;
each one runs the same loop as ``dr train`` / torchrun (``dr_pipeline.train.loop.train``).
Checkpoints, metrics and the curve go to the config's ``out_dir``, which every worker must
reach (an object store URL or a shared file system); a restarted job continues from it with
``--resume latest``, exactly where the last checkpoint left off.
"""

from __future__ import annotations

import argparse
import sys


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from dr_pipeline.train.config import load_train_config
    from dr_pipeline.train.loop import train

    cfg = load_train_config(loop_config["config"])
    device = ray.train.torch.get_device()
    result = train(cfg, resume=loop_config.get("resume"), device=device)
    ray.train.report(
        {
            "step": result.step,
            "samples": result.samples,
            "last_loss": result.losses[-1] if result.losses else float("nan"),
            "skipped": int(sum(result.skipped.values())),
        }
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="jobs/configs/train-*.yaml")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    p.add_argument("--workers", type=int, default=1, help="training processes (one per GPU with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs per worker, for its data-loader processes (default: data.num_workers + 1)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: connect or start local)")
    p.add_argument("--storage", default=None, help="Ray Train run storage (default: Ray's)")
    a = p.parse_args(argv)

    import os

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dr_pipeline.config import ConfigError
    from dr_pipeline.train.config import load_train_config

    try:
        cfg = load_train_config(a.config)  # fail fast, before any worker starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ray.init(address=a.address, ignore_reinit_error=True, logging_level="WARNING")
    cpus = a.cpus_per_worker if a.cpus_per_worker is not None else cfg.data.num_workers + 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": os.path.abspath(a.config), "resume": a.resume},
        torch_config=TorchConfig(backend="nccl" if a.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=a.workers, use_gpu=a.gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name="dr-train", storage_path=a.storage),
    )
    result = trainer.fit()
    print(f"done: {result.metrics or {}} (checkpoints, metrics.jsonl, curve.png in {cfg.out_dir})")
    return 0 if result.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
