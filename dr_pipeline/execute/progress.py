"""The live console of a job: shards done/total, samples/s, ETA, rejects by reason, stage shares.

On a terminal it is a tqdm bar whose postfix carries the rejects and stage shares; when stderr
is not a terminal (a log file, ``ray job logs``) it degrades to plain lines, at most one every
``every_s`` seconds plus one at the end, so a 200,000-shard job writes a readable log.
Per-shard work is O(1): counters only.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from tqdm import tqdm

from dr_pipeline.shards.dataset import ShardStats, stage_shares


def rejects_line(reasons: Counter, top: int = 3) -> str:
    return ", ".join(f"{r} {n}" for r, n in reasons.most_common(top))


class Progress:
    def __init__(self, total: int, stream=None, every_s: float = 5.0):
        self.total, self.done, self.samples = total, 0, 0
        self.rejected: Counter = Counter()
        self.stage_s: Counter = Counter()
        self.t0 = self._last = time.time()
        self.stream, self.every_s = stream, every_s
        self.bar = (
            tqdm(total=total, unit="shard", file=self.out, dynamic_ncols=True, smoothing=0.05, desc="reinforce")
            if self.out.isatty()
            else None
        )

    @property
    def out(self):
        return self.stream or sys.stderr  # looked up per line: sys.stderr may be redirected later

    def rate(self) -> float:
        return self.samples / max(time.time() - self.t0, 1e-9)

    def eta_s(self) -> float:
        dt = time.time() - self.t0
        return dt / self.done * (self.total - self.done) if self.done else float("nan")

    def update(self, stats: ShardStats) -> None:
        self.done += 1
        self.samples += stats.n_written
        self.rejected.update(stats.rejected_by_reason)
        self.stage_s.update(stats.stage_s)
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(1)
        elif time.time() - self._last >= self.every_s or self.done == self.total:
            self._last = time.time()
            print(
                f"[{self.done}/{self.total} shards] {self.samples} samples, ETA {self.eta_s():.0f}s | "
                f"{self._postfix()}",
                file=self.out,
                flush=True,
            )

    def _postfix(self) -> str:
        rej = sum(self.rejected.values())
        parts = [
            f"{self.rate():.1f} samples/s",
            f"rejected {rej}" + (f" ({rejects_line(self.rejected)})" if rej else ""),
        ]
        shares = stage_shares(self.stage_s)
        return " | ".join(parts + ([shares] if shares else []))

    def note(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=self.out)
        else:
            print(msg, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
