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
            raise ConfigError(f"{where}: expected a mapping, got a {type(value).__name__}")  # never echo: secrets
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


MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is refused
MAX_CONFIG_VALUES = 100_000  # values in a config once YAML aliases are expanded


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int, first: int):
        super().__init__(f"duplicate key '{key}' at line {line} (first at line {first}); keep one")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags) that refuses a key given twice in one mapping (PyYAML
    keeps the last one silently). Keys pulled in by a ``<<`` merge may be overridden, as YAML says."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise _DuplicateKey(key, line, first[key])
                    first[key] = line
                except TypeError:  # unhashable: the base constructor says so
                    pass
        return super().construct_mapping(node, deep=deep)


def _expanded_values(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """How many values ``node`` holds once every alias is expanded (what ``to_dict``, ``redact``
    and a dump would walk), in time linear in the *unexpanded* document; recursive aliases raise."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:
        raise yaml.YAMLError("a recursive alias (an anchor used inside itself) is not allowed")
    active.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_values(c, memo, active) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_values(k, memo, active) + _expanded_values(v, memo, active) for k, v in node.value)
    else:
        n = 1
    active.discard(id(node))
    memo[id(node)] = n
    return n


def safe_yaml(text: str, where: str) -> Any:
    """Parse YAML config text: plain YAML only (no Python tags, nothing executed), no key twice in
    one mapping, at most ``MAX_CONFIG_BYTES`` and ``MAX_CONFIG_VALUES`` values after alias
    expansion (an alias bomb is refused before anything expands it). Every problem is one
    ``ConfigError`` line naming ``where`` (and the line), never the values."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{where}: {len(text)} characters, larger than the {MAX_CONFIG_BYTES >> 20} MiB a config "
            "may have (is this the right file?)"
        )
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_values(node, {}, set())
        if n > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{where}: expands to {n} values through YAML aliases (limit {MAX_CONFIG_VALUES}; "
                "an alias bomb?): write the values out or drop the aliases"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        if isinstance(e, _DuplicateKey):
            raise ConfigError(f"{where}: {problem}") from None
        raise ConfigError(
            f"{where}: not valid YAML{at}: {problem} (fix the file; only plain YAML, no !!python tags, is accepted)"
        ) from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply (fix the file)") from None
    finally:
        loader.dispose()


def load_yaml(cls: type, path: str | Path) -> Any:
    """Load a config file with ``safe_yaml`` (no Python tags, no duplicate keys, bounded)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: {path.stat().st_size} bytes, larger than the {MAX_CONFIG_BYTES >> 20} MiB a "
            "config may have (is this the right file?)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    data = safe_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    return from_dict(cls, data, where=str(path))


_SO_MAPPINGS = ("client_kwargs", "config_kwargs", "s3_additional_kwargs", "headers")
_SO_SCALARS = (str, int, float, bool, type(None))


def check_storage_options(so: Any, where: str) -> None:
    """fsspec ``storage_options`` of a sane shape, else one ``ConfigError`` line that names the key
    but never a value (they hold credentials): a mapping with string keys, plain values (text,
    numbers, booleans, lists, mappings), and ``*_kwargs`` / ``headers`` entries that are mappings
    (s3fs fails deep inside botocore, with a traceback, on ``config_kwargs: 7``)."""
    if not isinstance(so, dict):
        raise ConfigError(f"{where}: expected a mapping of fsspec options, got a {type(so).__name__}")

    def walk(v: Any, at: str, depth: int) -> None:
        if depth > 8:
            raise ConfigError(f"{at}: nested deeper than 8 levels")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{at}: option names must be text, got a {type(k).__name__}")
                walk(x, f"{at}.{k}", depth + 1)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{at}[{i}]", depth + 1)
        elif not isinstance(v, _SO_SCALARS):
            raise ConfigError(
                f"{at}: a {type(v).__name__} is not a valid option value (use text, numbers, "
                "true/false, lists or mappings)"
            )

    walk(so, where, 0)
    for k, v in so.items():
        if (k in _SO_MAPPINGS or k.endswith("_kwargs")) and not isinstance(v, dict):
            raise ConfigError(f"{where}.{k}: expected a mapping, got a {type(v).__name__}")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# A field added after outputs were written, whose default keeps the old behaviour, carries
# ``metadata=SINCE_DEFAULT``: it enters the output hash only when set to another value, so the
# datasets made before it still resume.
SINCE_DEFAULT = {"hash": "unless_default"}


def _hash_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {
            f.name: _hash_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("hash") == "unless_default" and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, (list, tuple)):
        return [_hash_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _hash_dict(v) for k, v in obj.items()}
    return obj


def stable_hash(obj: Any) -> str:
    blob = json.dumps(_hash_dict(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


SECRET_WORDS = (
    "secret",
    "password",
    "passwd",
    "token",
    "key_id",
    "access_key",
    "session",
    "credential",
    "_key",
    "apikey",
    "auth",
    "connection_string",
    "signature",
)
SECRET_NAMES = ("key", "pass", "pwd")  # exact names: s3fs's access key id is plain `key`
REDACTED = "***"


def is_secret_name(name: object) -> bool:
    n = str(name).lower()
    return n in SECRET_NAMES or any(w in n for w in SECRET_WORDS)


def redact(obj: Any) -> Any:
    """Plain dict/list tree of ``obj`` (config dataclasses or plain data) with the secret-looking
    values of free-form mappings (``storage_options``) replaced, for logs and dumps. A config
    dataclass's field names are the schema, never secrets (``join_key``, ``syn_key_regex``), so
    a dumped config loads back (``from_dict(cls, strip_redacted(dumped))``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: redact(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
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


# --------------------------------------------------------------------------- paths
#
# THE PATH RULE (docs/cluster.md "Paths"): a path on the command line is relative to the current
# folder; a path written inside a config file (job or ensemble) is relative to the folder of
# that file. Besides: URLs (``s3://...``) and absolute paths are taken as written, ``~`` is the
# home folder, and ``pkg:NAME`` names a file shipped with the installed package (``pkg:teachers/
# synthetic.yaml``: the project's teachers/ folder, in a checkout, an editable install or a wheel).

PKG = "pkg:"
SHIPPED = ("teachers", "schemas")  # top-level folders shipped with the package (pyproject data-files)


def data_root() -> Path:
    """Where the shipped folders live: the source tree of this package (a checkout or an editable
    install, as in the Docker image), else ``<prefix>/share/dr_pipeline`` of a wheel install."""
    import sys
    import sysconfig

    tree = Path(__file__).resolve().parents[1]
    if (tree / SHIPPED[0]).is_dir():
        return tree
    for prefix in (sysconfig.get_path("data"), sys.prefix):
        share = Path(prefix) / "share" / "dr_pipeline"
        if (share / SHIPPED[0]).is_dir():
            return share
    return tree


def shipped(name: str) -> Path:
    """``pkg:NAME`` -> the shipped file (``teachers/dfndr2b.yaml``); ConfigError naming the choices."""
    path = data_root() / name
    if not path.exists():
        have = sorted(f"{PKG}{p.relative_to(data_root())}" for d in SHIPPED for p in (data_root() / d).glob("*.yaml"))
        raise ConfigError(f"no shipped file {PKG}{name} (shipped: {', '.join(have) or 'none'})")
    return path


def is_url(p: str) -> bool:
    return "://" in p


def resolve_path(p: str, base: str | Path) -> str:
    """Apply the path rule to ``p`` written in a config file whose folder is ``base``."""
    if is_url(p):
        return p
    if p.startswith(PKG):
        return str(shipped(p[len(PKG) :]))
    q = Path(p).expanduser()
    if q.is_absolute():
        return str(q)
    import os.path

    return os.path.normpath(os.path.join(str(base), str(q)))


def ray_package_root(path: str | Path) -> Path | None:
    """The ``--working-dir`` copy that ``ray job submit`` unpacked and ``path`` lies in, if any."""
    p = Path(path)
    for parent in (p, *p.parents):
        if parent.name.startswith("_ray_pkg_") or parent.parent.name == "working_dir_files":
            return parent
    return None


def cuda_visible() -> bool:
    """Whether this machine can have a CUDA device, without importing torch: an NVIDIA driver is
    loaded (/proc/driver/nvidia or /dev/nvidia0) and CUDA_VISIBLE_DEVICES does not hide them all."""
    import os

    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def check_device(ex: ExecutionSpec, executor: str, local_machine: bool) -> None:
    """``device: cuda`` that cannot work, found at config time (not after minutes of actor retries):
    Ray actors that ask for no GPU never see one; a run on this machine needs a CUDA driver here.
    A job sent to a cluster is not checked against the driver's machine (its GPUs are on workers)."""
    if ex.device != "cuda":
        return
    if executor == "ray" and ex.gpus_per_actor <= 0:
        raise ConfigError(
            "execution.device is cuda but execution.gpus_per_actor is 0: Ray hides GPUs from "
            "actors that ask for none; set gpus_per_actor: 1 (one actor per GPU) or device: auto"
        )
    if local_machine and not cuda_visible():
        raise ConfigError(
            "device cuda, but this machine has no CUDA device (no NVIDIA driver, or "
            "CUDA_VISIBLE_DEVICES hides them): use --device auto or cpu, or send the job to a "
            "GPU cluster (--address / ray job submit)"
        )


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugSpec:
    """RandomResizedCrop + RandAugment (+ optional flip), as in MobileCLIP's reinforcement."""

    n_aug: int = 4
    size: int = 224  # generation size: DataCompDR magnitudes are expressed at it
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
    context_length: int | None = None  # None: the model's own
    force_quick_gelu: bool = False


@dataclass(frozen=True)
class SamplingSpec:
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    temperature: float = 1.0
    max_len: int = 30  # tokens, incl. start token
    min_len: int = 5
    max_attempts: int = 3  # resample a degenerate caption at most this often
    # A draw is given up while it is decoded (and redrawn at once) when its finished words hold
    # one word this many times in a row (3: only draws the final check rejects anyway, so no
    # caption changes; 0 = off), or a run of this many words without a letter (0 = off).
    give_up_repeat: int = field(default=3, metadata=SINCE_DEFAULT)
    give_up_nonword_run: int = field(default=0, metadata=SINCE_DEFAULT)

    def __post_init__(self) -> None:
        if self.give_up_repeat < 0 or self.give_up_nonword_run < 0:
            raise ConfigError("sampling: need give_up_repeat >= 0 and give_up_nonword_run >= 0")


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
    model_configs: str | None = None  # folder of extra open_clip model JSONs (tiny models)
    source: str = ""  # folder the file was loaded from (paths resolve here)

    def __post_init__(self) -> None:
        ids = [t.id for t in self.teachers] + [c.id for c in self.captioners]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ConfigError(
                f"ensemble '{self.name}': duplicate ids {sorted(dup)}; give every teacher/captioner a unique id"
            )
        if not self.teachers:
            raise ConfigError(f"ensemble '{self.name}': needs at least one teacher")
        for i in ids:
            if not i.replace("-", "").replace("_", "").isalnum():
                raise ConfigError(f"ensemble '{self.name}': id '{i}' may only hold letters, digits, '-' and '_'")

    def resolve(self, p: str | None) -> str | None:
        """A checkpoint path by the path rule (relative to the ensemble file, ``pkg:``, ``~``);
        open_clip tags (a bare word) and ``hf-hub:`` ids are left alone, ``local-dir:`` keeps its
        prefix around the resolved folder."""
        if p is None or p.startswith("hf-hub:") or "/" not in p and "." not in p and not p.startswith(PKG):
            return p
        if p.startswith("local-dir:"):
            return "local-dir:" + resolve_path(p[len("local-dir:") :], self.source)
        return resolve_path(p, self.source)

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
    urls: str | tuple[str, ...]  # path, brace pattern, glob or s3:// URL(s)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_storage_options(self.storage_options, "input.storage_options")
        urls = [self.urls] if isinstance(self.urls, str) else list(self.urls)
        if not urls or any(not u.strip() for u in urls):
            raise ConfigError(
                "input.urls is empty; set input.urls to shard file(s), a brace pattern, a glob or a directory"
            )


@dataclass(frozen=True)
class OutputSpec:
    path: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    compression_level: int = 3

    def __post_init__(self) -> None:
        check_storage_options(self.storage_options, "output.storage_options")
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

    address: str | None = None  # None: a new local Ray (or $RAY_ADDRESS); "auto" / host:port / ray://... for a cluster
    num_cpus: int | None = None  # for a local Ray instance
    num_gpus: int | None = None  # for a local Ray instance (None: what Ray detects)
    min_actors: int = 1  # fewer ready actors than this for actor_start_timeout_s fails the job
    max_actors: int = 2  # actors asked for (capped by the number of shards to do)
    cpus_per_actor: float = 1.0  # Ray resources per model actor; also its torch threads
    gpus_per_actor: float = 0.0  # 1 = one actor per GPU; 0.5 = two actors share a GPU
    actor_start_timeout_s: float = 600.0  # how long the pool may stay below min_actors (placement, autoscaling)
    batch_size: int = 32
    max_attempts: int = 3  # per shard, counting the first; permanent errors (403/404) get one
    io_attempts: int = 6  # per storage call on transient errors (backoff with jitter)
    io_backoff_s: float = 0.5  # first backoff ceiling; doubles per retry (capped at 20 s)
    device: str = "auto"  # auto | cpu | cuda
    decode_threads: int = 2
    shard_timeout_s: float = 0.0  # a shard attempt running longer is hung: its actor is killed, the shard
    # retried elsewhere. 0 = auto: max(shard_timeout_min_s, 10 x the median
    # shard time so far); no deadline before 3 shards finished
    shard_timeout_min_s: float = 600.0
    manifest_every_s: float = 60.0  # the driver checkpoints manifest.json this often (and at the end)
    # captioners: rows decoded together (0 = all batch_size x k of a batch; else chunks of whole
    # images), and below how many busy rows free slots start later draws early (-1 = auto: 16 on
    # CPU, the whole chunk on CUDA; 0 = never). Captions do not depend on either.
    caption_decode_batch: int = 0
    caption_speculate_rows: int = -1
    caption_compile: str = "auto"  # torch.compile the decoder step: auto (on CUDA) | always | never

    def __post_init__(self) -> None:
        if self.shard_timeout_s < 0 or self.shard_timeout_min_s <= 0 or self.manifest_every_s <= 0:
            raise ConfigError("execution: need shard_timeout_s >= 0, shard_timeout_min_s > 0, manifest_every_s > 0")
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
        if self.caption_decode_batch < 0 or self.caption_speculate_rows < -1:
            raise ConfigError("execution: need caption_decode_batch >= 0 and caption_speculate_rows >= -1")
        if self.caption_compile not in ("auto", "always", "never"):
            raise ConfigError(f"execution.caption_compile must be auto, always or never (got {self.caption_compile!r})")


@dataclass(frozen=True)
class JobConfig:
    input: InputSpec
    output: OutputSpec
    teachers: str  # path of a teachers/*.yaml ensemble file
    seed: int = 0
    aug: AugSpec = field(default_factory=AugSpec)
    captions: CaptionSpec = field(default_factory=CaptionSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    min_image_side: int = 8  # smaller images are rejected ("too_small")
    source: str = ""  # folder of the job file: relative paths in it resolve here

    def __post_init__(self) -> None:
        if not self.teachers.strip():
            raise ConfigError("teachers is empty; set teachers: to an ensemble file such as teachers/tiny.yaml")
        if self.min_image_side < 1:
            raise ConfigError(f"min_image_side must be >= 1 (got {self.min_image_side})")

    def ensemble_path(self) -> Path:
        """``teachers:`` by the path rule: relative to the job file's folder, or ``pkg:teachers/...``."""
        return Path(resolve_path(self.teachers, self.source or "."))

    def _output_fields(self, ensemble: EnsembleSpec) -> dict:
        """Everything that determines the output bytes (not how the job runs)."""
        return {
            "input": self.input.urls,
            "seed": self.seed,
            "aug": self.aug,
            "captions": self.captions,
            "min_image_side": self.min_image_side,
            "teachers": list(ensemble.teachers),
            "captioners": list(ensemble.captioners),
        }

    def output_hash(self, ensemble: EnsembleSpec) -> str:
        return stable_hash(self._output_fields(ensemble))

    def output_fingerprint(self, ensemble: EnsembleSpec) -> dict[str, str]:
        """A short hash per output-determining key (``aug.n_aug``, ``teachers[0]``...): two configs'
        fingerprints name the keys that differ without storing any value (URLs may hold secrets)."""
        flat: dict[str, str] = {}

        def walk(prefix: str, v: Any) -> None:
            v = to_dict(v)
            if isinstance(v, dict) and v:
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
            elif isinstance(v, list) and v and prefix not in ("input",):
                for i, x in enumerate(v):
                    walk(f"{prefix}[{i}]", x)
            else:
                flat[prefix] = stable_hash(v)[:8]

        walk("", self._output_fields(ensemble))
        return flat


def load_job(path: str | Path) -> JobConfig:
    """A job file with its paths resolved by the path rule (relative to the file's folder), so the
    job means the same from any current folder, under ``ray job submit`` and on a KubeRay head."""
    path = Path(path)
    job = load_yaml(JobConfig, path)
    base = path.resolve().parent
    urls = job.input.urls
    urls = resolve_path(urls, base) if isinstance(urls, str) else tuple(resolve_path(u, base) for u in urls)
    job = dataclasses.replace(
        job,
        source=str(base),
        input=dataclasses.replace(job.input, urls=urls),
        output=dataclasses.replace(job.output, path=resolve_path(job.output.path, base)),
    )
    _refuse_ray_package_output(job, path)
    return job


def load_job_ensemble(job: JobConfig) -> EnsembleSpec:
    """The job's ensemble file (``teachers:`` by the path rule), loaded strictly."""
    path = job.ensemble_path()
    if not path.is_file():
        raise ConfigError(
            f"teachers file not found: {path} (set 'teachers:' to an ensemble file, relative to "
            f"the job file's folder {job.source or '.'}, or a shipped one: pkg:teachers/NAME.yaml)"
        )
    return load_ensemble(path)


def _refuse_ray_package_output(job: JobConfig, path: Path) -> None:
    """Under ``ray job submit --working-dir``, a relative output path would land in Ray's temporary
    copy of the working dir (deleted later; git-ignored data such as out/ is never uploaded)."""
    pkg = ray_package_root(path.resolve())
    out = job.output.path
    if pkg is None or is_url(out) or ray_package_root(out) is None:
        return
    raise ConfigError(
        f"{path.name}: output.path resolves inside the --working-dir copy Ray uploaded ({pkg}), which Ray "
        "deletes and which holds no git-ignored data: pass the config by absolute path on a disk the "
        'cluster sees (--config "$PWD/jobs/configs/..."), or use an absolute path / s3:// URL'
    )
