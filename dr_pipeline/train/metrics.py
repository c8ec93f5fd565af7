"""Training metrics: ``metrics.jsonl`` (one JSON row per logged step) and ``curve.png``."""

from __future__ import annotations

import io
import json

from dr_pipeline.storage.folder import Folder

METRICS = "metrics.jsonl"
CURVE = "curve.png"
LOSS_KEYS = ("loss", "contrastive_loss", "distill_loss", "clip_gt", "clip_syn", "distill_gt", "distill_syn")


class MetricsLog:
    """Rows in memory; appended to the file as they come on a local disk, rewritten on flush
    elsewhere (object stores cannot append). On resume, rows after the checkpoint's step go."""

    def __init__(self, out: Folder, resume_step: int | None):
        self.out = out
        self.rows: list[dict] = []
        if resume_step is not None:
            text = out.read_text(METRICS) or ""
            self.rows = [
                r
                for r in (json.loads(line) for line in text.splitlines() if line.strip())
                if r.get("step", 0) <= resume_step
            ]
        self._write_all()

    def _write_all(self) -> None:
        self.out.write_bytes(METRICS, "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.out.local:
            with self.out.open_local(METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        if not self.out.local:
            self._write_all()
        if self.rows:
            self.out.write_bytes(CURVE, plot_curve(self.rows))


def plot_curve(rows: list[dict]) -> bytes:
    """PNG bytes: loss parts (left) and learning rate (right) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for k in LOSS_KEYS:
        if any(k in r for r in rows):
            ax.plot(
                [r["step"] for r in rows if k in r],
                [r[k] for r in rows if k in r],
                label=k,
                linewidth=2 if k == "loss" else 1,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in rows if "lr" in r], [r["lr"] for r in rows if "lr" in r], color="tab:gray")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("schedule")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
