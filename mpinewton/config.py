"""Job configuration: frozen dataclasses and the TOML loader.

A job file's tables and keys are exactly the dataclasses' fields below; an
unknown key is an error that names the nearest valid key. ``--set
section.key=value`` overrides are parsed as TOML values and go through the same
checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: The job that runs when ``python -m mpinewton.train`` gets no JOB argument.
DEFAULT_JOB = Path(__file__).resolve().parent.parent / "jobs" / "mnist_cnn.toml"


class ConfigError(ValueError):
    """A job file or override that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class RunConfig:
    """What the run is called and where it writes."""

    name: str = "run"  # run name; the default run directory is runs/<name>
    seed: int = 0  # seed of weight initialisation and every other random choice
    run_dir: str = ""  # run directory; empty means runs/<name>


@dataclass(frozen=True)
class DataConfig:
    """Which HDF5 dataset to train on (format: docs/data.md)."""

    path: str = "data/mnist.h5"  # HDF5 dataset written by `python -m mpinewton.data`
    train_splits: tuple[str, ...] = ("train",)  # splits trained on, concatenated
    eval_splits: tuple[str, ...] = ("validation",)  # splits whose accuracy is reported
    limit: int = 0  # use only the first `limit` training samples (0 = all)
    pixel_scale: float = 255.0  # inputs are uint8 / pixel_scale (thesis section 10.1)
    preprocess: str = "scale"  # scale: x / pixel_scale | caffe: Keras' ResNet50 preprocessing
    eval_limit: int = 0  # final accuracies on at most this many samples per split (0 = all)


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build (see mpinewton.models)."""

    name: str = "thesis_cnn"  # thesis_cnn | mlp | resnet50 | resnet_mini
    dtype: str = "float64"  # float32 | float64
    input_shape: tuple[int, ...] = (28, 28, 1)  # sample shape the model takes (H, W, C)
    hidden: tuple[int, ...] = (32,)  # hidden layer widths for the mlp model
    num_classes: int = 10  # number of output classes
    weights: str = ""  # start from these weights (Keras .weights.h5 or mpinewton weights.h5)
    perturb_std: float = 0.0  # thesis 15.3: start from w * p, p ~ N(1, perturb_std) elementwise


@dataclass(frozen=True)
class ObjectiveConfig:
    """How the per-rank sums are computed (see mpinewton.local)."""

    loss: str = "categorical_crossentropy"  # categorical_crossentropy | mean_squared_error
    micro_batch: int = 2000  # samples per compiled call; bounds per-rank memory
    jit: bool = True  # compile with XLA (measured faster on CPU, docs/benchmarks.md)
    hvp: str = "reverse_over_reverse"  # reverse_over_reverse | forward_over_reverse


@dataclass(frozen=True)
class OptimizerConfig:
    """Thesis Algorithm 4 (section 9.2) and its gradient-descent baseline."""

    method: str = "newton"  # newton | gd
    batch_size: int = 0  # samples per iteration, drawn afresh each time (thesis 8.2); 0 = all
    iters: int = 20  # Newton (or gd) iterations after pre-training
    pretrain_iters: int = 60  # gradient-descent pre-training iterations
    pretrain_lr: float = 1.0  # learning rate of pre-training
    learning_rate: float = 1.0  # fixed step size (gd, or newton with step_rule = fixed)
    damping: float = 0.0  # Tikhonov damping alpha in (H + alpha I) s = -g (thesis 7.2)
    cg_rtol: float = 1e-2  # CG stops when |r| <= cg_rtol |g| (times sqrt(n) if scaled)
    cg_max_iter: int = 50  # CG iteration cap
    cg_scale_tol_sqrt_n: bool = False  # thesis 9.2: multiply the CG tolerance by sqrt(n)
    warm_start: str = "previous"  # zero | previous | weights (thesis 14.3: w/|w|)
    descent_threshold: float = 0.0  # T: fall back to -g when g.s > T
    step_rule: str = "armijo"  # armijo | fixed
    armijo_beta: float = 0.5  # backtracking factor beta
    armijo_gamma: float = 1e-4  # sufficient-decrease constant gamma
    armijo_max_trials: int = 20  # line-search trial cap


@dataclass(frozen=True)
class ThreadsConfig:
    """TensorFlow thread pools per rank, set before TensorFlow starts."""

    intra_op: int = 0  # 0 = cores on this node / ranks on this node
    inter_op: int = 1  # inter-op pool size


@dataclass(frozen=True)
class CheckpointConfig:
    """When rank 0 writes HDF5 checkpoints into DIR/checkpoints (docs/checkpoints.md)."""

    every: int = 0  # also checkpoint every `every` iterations (0 = only at the end and on signal)
    keep: int = 3  # keep the last `keep` checkpoints


@dataclass(frozen=True)
class JobConfig:
    """A whole job: one TOML file, one table per section."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The job as plain TOML-compatible tables."""
        return {
            f.name: {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
            for f in fields(self)
        }

    def to_toml(self) -> str:
        """The job as a TOML document that :func:`load_job` reads back unchanged."""
        lines: list[str] = []
        for section, table in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
            lines.append("")
        return "\n".join(lines)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: identifies the resolved job."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "name"): ("thesis_cnn", "mlp", "resnet50", "resnet_mini"),
    ("data", "preprocess"): ("scale", "caffe"),
    ("model", "dtype"): ("float32", "float64"),
    ("objective", "loss"): ("categorical_crossentropy", "mean_squared_error"),
    ("objective", "hvp"): ("reverse_over_reverse", "forward_over_reverse"),
    ("optimizer", "method"): ("newton", "gd"),
    ("optimizer", "warm_start"): ("zero", "previous", "weights"),
    ("optimizer", "step_rule"): ("armijo", "fixed"),
}

_POSITIVE = {
    ("objective", "micro_batch"), ("optimizer", "cg_max_iter"), ("optimizer", "cg_rtol"),
    ("optimizer", "armijo_max_trials"), ("data", "pixel_scale"), ("model", "num_classes"),
    ("optimizer", "learning_rate"), ("optimizer", "pretrain_lr"), ("threads", "inter_op"),
    ("checkpoint", "keep"),
}
_NON_NEGATIVE = {
    ("optimizer", "iters"), ("optimizer", "pretrain_iters"), ("optimizer", "damping"),
    ("data", "limit"), ("threads", "intra_op"), ("checkpoint", "every"),
    ("optimizer", "batch_size"), ("model", "perturb_std"), ("data", "eval_limit"),
}
_OPEN_UNIT = {("optimizer", "armijo_beta"), ("optimizer", "armijo_gamma")}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else (
            "nan" if value != value else ("inf" if value > 0 else "-inf"))
    return str(value)


def _nearest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    return close[0] if close else valid[0]


def _section_classes() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(JobConfig)}  # type: ignore[misc]


def _coerce(section: str, key: str, value: Any, default: Any, where: str) -> Any:
    """Check one value's type against the field default and convert lists to tuples."""
    expected = type(default)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        if ok:
            item_type = type(default[0]) if default else str
            ok = all(isinstance(v, item_type) and not isinstance(v, bool) for v in value)
            value = tuple(value)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(
            f"{where}: {section}.{key} = {value!r} has the wrong type; "
            f"expected {expected.__name__} like {default!r}")
    choices = _CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{where}: {section}.{key} = {value!r} is not one of {', '.join(choices)}; "
            f"did you mean {_nearest(str(value), list(choices))!r}?")
    if (section, key) in _POSITIVE and not value > 0:
        raise ConfigError(f"{where}: {section}.{key} = {value!r} must be > 0")
    if (section, key) in _NON_NEGATIVE and not value >= 0:
        raise ConfigError(f"{where}: {section}.{key} = {value!r} must be >= 0")
    if (section, key) == ("optimizer", "descent_threshold") and not value <= 0:
        raise ConfigError(f"{where}: {section}.{key} = {value!r} must be <= 0 (thesis 9.2: T < 0)")
    if (section, key) in _OPEN_UNIT and not 0 < value < 1:
        raise ConfigError(f"{where}: {section}.{key} = {value!r} must lie in (0, 1)")
    return value


def build_job(tables: dict[str, Any], where: str = "job") -> JobConfig:
    """Build a :class:`JobConfig` from parsed TOML tables, checking every key."""
    classes = _section_classes()
    sections: dict[str, Any] = {}
    for section, table in tables.items():
        if section not in classes:
            raise ConfigError(
                f"{where}: unknown section [{section}]; did you mean "
                f"[{_nearest(section, list(classes))}]? Valid sections: {', '.join(classes)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table, got {table!r}")
        cls = classes[section]
        defaults = {f.name: getattr(cls(), f.name) for f in fields(cls)}
        values = {}
        for key, value in table.items():
            if key not in defaults:
                raise ConfigError(
                    f"{where}: unknown key {section}.{key}; did you mean "
                    f"{section}.{_nearest(key, list(defaults))}?")
            values[key] = _coerce(section, key, value, defaults[key], where)
        sections[section] = cls(**values)
    return JobConfig(**sections)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value`` (value in TOML syntax; bare words are strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. optimizer.iters=5")
    lhs, raw = text.split("=", 1)
    section, key = (part.strip() for part in lhs.split(".", 1))
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_job(path: str | Path | None = None,
             overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a TOML job (the default job when ``path`` is None) and apply overrides."""
    job_path = Path(path) if path is not None else DEFAULT_JOB
    try:
        text = job_path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"job file {job_path} does not exist; jobs live in jobs/*.toml") from None
    except IsADirectoryError:
        raise ConfigError(f"job file {job_path} is a directory, not a TOML file") from None
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{job_path}: not valid TOML: {exc}") from None
    for item in overrides:
        section, key, value = parse_override(item)
        tables.setdefault(section, {})
        if not isinstance(tables[section], dict):
            raise ConfigError(f"--set {item!r}: [{section}] is not a table")
        tables[section][key] = value
    return build_job(tables, where=str(job_path))
