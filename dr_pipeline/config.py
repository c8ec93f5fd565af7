"""Frozen, typed configs loaded from YAML.

Every config is a frozen dataclass. ``load_yaml(cls, path)`` refuses unknown keys (a typo
must never be ignored silently) and names the closest valid key. ``ConfigError`` carries a
one-line message naming the problem and the fix; the CLI prints it and exits 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config or CLI problem detected before any model is loaded or shard written."""


# --------------------------------------------------------------------------- generic loader

def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        last: Exception | None = None
        for a in non_none:
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _sub(where: str, name: str) -> str:
    """'job.yaml' + 'aug' -> 'job.yaml: aug'; 'job.yaml: aug' + 'n_aug' -> 'job.yaml: aug.n_aug'."""
    if not where:
        return name
    return f"{where}: {name}" if where.endswith((".yaml", ".yml")) else f"{where}.{name}"


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error, never ignored."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
        raise ConfigError(f"{where or cls.__name__}: unknown key '{k}'{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = _sub(where, f.name)
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"{where or cls.__name__}: missing required key '{f.name}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def load_yaml(cls: type, path: str | Path) -> Any:
    """Load a config file with ``yaml.safe_load`` (no Python tags, nothing executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {problem} (fix the file; only plain YAML, "
                          "no !!python tags, is accepted)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    return from_dict(cls, data, where=str(path))


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def stable_hash(obj: Any) -> str:
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


SECRET_WORDS = ("secret", "password", "passwd", "token", "key_id", "access_key", "session", "credential",
                "_key", "apikey", "auth", "connection_string", "signature")
SECRET_NAMES = ("key", "pass", "pwd")    # exact names: s3fs's access key id is plain `key`
REDACTED = "***"


def is_secret_name(name: object) -> bool:
    n = str(name).lower()
    return n in SECRET_NAMES or any(w in n for w in SECRET_WORDS)


def redact(obj: Any) -> Any:
    """Copy of a plain dict/list tree with secret-looking values replaced (for logs and dumps)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_name(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def strip_redacted(obj: Any) -> Any:
    """Drop values ``redact`` replaced, so options read back from a dumped config fall back to
    the environment's credentials instead of passing '***' as one."""
    if isinstance(obj, dict):
        return {k: strip_redacted(v) for k, v in obj.items() if v != REDACTED}
    if isinstance(obj, list):
        return [strip_redacted(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- augmentation

@dataclass(frozen=True)
class AugSpec:
    """RandomResizedCrop + RandAugment (+ optional flip), as in MobileCLIP's reinforcement."""
    n_aug: int = 4
    size: int = 224                  # generation size: DataCompDR magnitudes are expressed at it
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaug_ops: int = 2
    randaug_magnitude: int = 9
    randaug_bins: int = 31
    flip: bool = False

    def __post_init__(self) -> None:
        if self.n_aug < 1:
            raise ConfigError(f"aug.n_aug must be >= 1 (got {self.n_aug}); set aug.n_aug to 1 or more")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ConfigError(f"aug.scale must satisfy 0 < lo <= hi <= 1 (got {self.scale})")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"aug.ratio must satisfy 0 < lo <= hi (got {self.ratio})")
        if not (0 <= self.randaug_ops <= 3):
            raise ConfigError(f"aug.randaug_ops must be in 0..3 (got {self.randaug_ops})")
        if not (0 <= self.randaug_magnitude < self.randaug_bins <= 64):
            raise ConfigError("aug.randaug_magnitude must be in [0, randaug_bins) and randaug_bins <= 64")
        if self.size < 8:
            raise ConfigError(f"aug.size must be >= 8 (got {self.size})")


# --------------------------------------------------------------------------- teacher ensemble

@dataclass(frozen=True)
class TeacherSpec:
    """One CLIP teacher: an open_clip model name plus where its weights come from.

    ``pretrained`` is an open_clip pretrained tag (e.g. ``dfn2b``), an ``hf-hub:org/repo`` id,
    or a local checkpoint path (relative paths resolve against the ensemble file's folder).
    """
    id: str
    model: str
    pretrained: str | None = None
    logit_scale: float = 100.0
    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    context_length: int | None = None   # None: the model's own
    force_quick_gelu: bool = False


@dataclass(frozen=True)
class SamplingSpec:
    top_p: float = 0.9
    top_k: int = 0                 # 0 = off
    temperature: float = 1.0
    max_len: int = 30              # tokens, incl. start token
    min_len: int = 5
    max_attempts: int = 3          # resample a degenerate caption at most this often


@dataclass(frozen=True)
class CaptionerSpec:
    id: str
    model: str
    pretrained: str | None = None
    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    sampling: SamplingSpec = field(default_factory=SamplingSpec)


@dataclass(frozen=True)
class EnsembleSpec:
    name: str
    teachers: tuple[TeacherSpec, ...]
    captioners: tuple[CaptionerSpec, ...] = ()
    model_configs: str | None = None     # folder of extra open_clip model JSONs (tiny models)
    source: str = ""                     # folder the file was loaded from (paths resolve here)

    def __post_init__(self) -> None:
        ids = [t.id for t in self.teachers] + [c.id for c in self.captioners]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ConfigError(f"ensemble '{self.name}': duplicate ids {sorted(dup)}; give every teacher/captioner a unique id")
        if not self.teachers:
            raise ConfigError(f"ensemble '{self.name}': needs at least one teacher")
        for i in ids:
            if not i.replace("-", "").replace("_", "").isalnum():
                raise ConfigError(f"ensemble '{self.name}': id '{i}' may only hold letters, digits, '-' and '_'")

    def resolve(self, p: str | None) -> str | None:
        """Resolve a local relative path against the ensemble file's folder; leave tags/ids alone."""
        if p is None or p.startswith("hf-hub:") or "://" in p or "/" not in p and "." not in p:
            return p
        q = Path(p)
        return str(q if q.is_absolute() else Path(self.source) / q)

    def teacher(self, tid: str) -> TeacherSpec:
        for t in self.teachers:
            if t.id == tid:
                return t
        raise ConfigError(f"ensemble '{self.name}' has no teacher '{tid}' (has {[t.id for t in self.teachers]})")


def load_ensemble(path: str | Path) -> EnsembleSpec:
    path = Path(path)
    spec = load_yaml(EnsembleSpec, path)
    return dataclasses.replace(spec, source=str(path.resolve().parent))


# --------------------------------------------------------------------------- job

@dataclass(frozen=True)
class InputSpec:
    urls: str | tuple[str, ...]               # path, brace pattern, glob or s3:// URL(s)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        urls = [self.urls] if isinstance(self.urls, str) else list(self.urls)
        if not urls or any(not u.strip() for u in urls):
            raise ConfigError("input.urls is empty; set input.urls to shard file(s), a brace pattern, "
                              "a glob or a directory")


@dataclass(frozen=True)
class OutputSpec:
    path: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    compression_level: int = 3

    def __post_init__(self) -> None:
        if not self.path.strip():
            raise ConfigError("output.path is empty; set output.path to a new folder or s3:// prefix")
        if not 1 <= self.compression_level <= 22:
            raise ConfigError(f"output.compression_level must be in 1..22 (zstd), got {self.compression_level}")


@dataclass(frozen=True)
class CaptionSpec:
    k: int = 5

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"captions.k must be >= 0 (got {self.k})")


@dataclass(frozen=True)
class ExecutionSpec:
    """How the job runs. Nothing here changes the output bytes, so it is not in the config hash."""
    address: str | None = None        # None: a new local Ray (or $RAY_ADDRESS); "auto" / host:port / ray://... for a cluster
    num_cpus: int | None = None       # for a local Ray instance
    num_gpus: int | None = None       # for a local Ray instance (None: what Ray detects)
    min_actors: int = 1               # fewer ready actors than this for actor_start_timeout_s fails the job
    max_actors: int = 2               # actors asked for (capped by the number of shards to do)
    cpus_per_actor: float = 1.0       # Ray resources per model actor; also its torch threads
    gpus_per_actor: float = 0.0       # 1 = one actor per GPU; 0.5 = two actors share a GPU
    actor_start_timeout_s: float = 600.0   # how long the pool may stay below min_actors (placement, autoscaling)
    batch_size: int = 32
    max_attempts: int = 3             # per shard, counting the first; permanent errors (403/404) get one
    io_attempts: int = 6              # per storage call on transient errors (backoff with jitter)
    io_backoff_s: float = 0.5         # first backoff ceiling; doubles per retry (capped at 20 s)
    device: str = "auto"              # auto | cpu | cuda
    decode_threads: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("execution.batch_size must be >= 1")
        if not (1 <= self.min_actors <= self.max_actors):
            raise ConfigError("execution: need 1 <= min_actors <= max_actors")
        if self.max_attempts < 1:
            raise ConfigError("execution.max_attempts must be >= 1")
        if self.io_attempts < 1 or self.io_backoff_s < 0:
            raise ConfigError("execution: need io_attempts >= 1 and io_backoff_s >= 0")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0 or self.actor_start_timeout_s <= 0:
            raise ConfigError("execution: need cpus_per_actor >= 0, gpus_per_actor >= 0, actor_start_timeout_s > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"execution.device must be auto, cpu or cuda (got {self.device!r})")


@dataclass(frozen=True)
class JobConfig:
    input: InputSpec
    output: OutputSpec
    teachers: str                     # path of a teachers/*.yaml ensemble file
    seed: int = 0
    aug: AugSpec = field(default_factory=AugSpec)
    captions: CaptionSpec = field(default_factory=CaptionSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    min_image_side: int = 8           # smaller images are rejected ("too_small")
    source: str = ""                  # folder of the job file (relative teacher path resolves here)

    def __post_init__(self) -> None:
        if not self.teachers.strip():
            raise ConfigError("teachers is empty; set teachers: to an ensemble file such as teachers/tiny.yaml")
        if self.min_image_side < 1:
            raise ConfigError(f"min_image_side must be >= 1 (got {self.min_image_side})")

    def ensemble_path(self) -> Path:
        p = Path(self.teachers)
        if p.is_absolute() or p.exists():
            return p
        return Path(self.source) / p

    def output_hash(self, ensemble: EnsembleSpec) -> str:
        """Hash of everything that determines the output bytes (not how the job runs)."""
        return stable_hash({
            "input": self.input.urls, "seed": self.seed, "aug": self.aug, "captions": self.captions,
            "min_image_side": self.min_image_side,
            "teachers": list(ensemble.teachers),
            "captioners": list(ensemble.captioners),
        })


def load_job(path: str | Path) -> JobConfig:
    path = Path(path)
    job = load_yaml(JobConfig, path)
    return dataclasses.replace(job, source=str(path.resolve().parent))
