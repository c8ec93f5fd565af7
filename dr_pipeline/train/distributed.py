"""Process-group setup for torchrun / Ray Train, and small collectives on plain ints."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group (so we destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_pref: str = "auto", device: torch.device | None = None) -> DistEnv:
    """Join the process group torchrun / Ray Train describe (env RANK, WORLD_SIZE, ...).

    An already initialized group (Ray Train creates one) is used as is. A single process
    without those variables runs without a group. NCCL on CUDA, gloo on CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        dev = device or _pick_device(device_pref, local_rank)
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = device or _pick_device(device_pref, local_rank)
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return DistEnv(dist.get_rank(), world, local_rank, dev, owns_group=True)
    return DistEnv(0, 1, local_rank, dev, owns_group=False)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_ints(values: list[int], env: DistEnv) -> list[list[int]]:
    """Every rank's list of ints (same length on all ranks), in rank order."""
    if env.world == 1:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.long, device=env.device if env.device.type == "cuda" else "cpu")
    out = [torch.empty_like(t) for _ in range(env.world)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def mean_across_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    if env.world == 1 or not values:
        return values
    names = sorted(values)
    t = torch.tensor(
        [values[n] for n in names], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu"
    )
    dist.all_reduce(t)
    return {n: float(v) / env.world for n, v in zip(names, t.tolist())}


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()
