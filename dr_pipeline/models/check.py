"""``check_ensemble`` without torch in the calling process.

The check needs open_clip (model names, configs) and so torch: ~0.7 GB of RSS and seconds of
imports. A driver only schedules shards and never runs a model, so it runs the check in a
short-lived child process and keeps its own memory to what scheduling 200,000 shards needs.
A process that has torch loaded already (tests, ``--local``) checks in place.

Run as ``python -m dr_pipeline.models.check`` with the ensemble as JSON on stdin: exit 0 if
it is fine, 2 with the ``ConfigError`` message on stdout if not.
"""

from __future__ import annotations

import json
import subprocess
import sys

from dr_pipeline.config import ConfigError, EnsembleSpec, from_dict, to_dict


def check_ensemble_isolated(ensemble: EnsembleSpec) -> None:
    """Raise ``ConfigError`` exactly as ``teachers.check_ensemble`` would."""
    if "torch" in sys.modules:
        from dr_pipeline.models.teachers import check_ensemble

        check_ensemble(ensemble)
        return
    r = subprocess.run(
        [sys.executable, "-m", "dr_pipeline.models.check"],
        input=json.dumps(to_dict(ensemble)),
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode == 2:
        raise ConfigError(r.stdout.strip())
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"checking the ensemble failed in its child process (exit {r.returncode}): {tail}")


def main() -> int:
    from dr_pipeline.models.teachers import check_ensemble

    try:
        check_ensemble(from_dict(EnsembleSpec, json.loads(sys.stdin.read())))
    except ConfigError as e:
        print(e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
