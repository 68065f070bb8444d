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

from mpinewton.solvers import METHODS, ParameterError
from mpinewton.solvers.base import require

#: Option lists, defined once: the model builders, the local objective and the
#: job loader all take them from here.
MODEL_NAMES = ("thesis_cnn", "mlp", "resnet50", "resnet_mini")
DTYPES = ("float32", "float64")
LOSSES = ("categorical_crossentropy", "sparse_categorical_crossentropy", "binary_crossentropy",
          "mean_squared_error")
#: Prefix of ``objective.loss`` for any other Keras loss, e.g. ``"keras:huber"``.
KERAS_LOSS_PREFIX = "keras:"
HVP_MODES = ("reverse_over_reverse", "forward_over_reverse")
PREPROCESSES = ("scale", "caffe")
BATCH_GROWTH = ("none", "norm_test", "geometric")
CURVATURE_GROWTH = ("none", "damping")

#: The Newton-CG settings measured fastest (docs/results.md): what ``mpinewton.fit`` uses
#: when no job is given. ``jobs/mnist_cnn.toml`` spells out the same (a test checks it), with
#: the thesis' 60 pre-training iterations, which a user's model may not survive at lr 1.
RECOMMENDED_OPTIMIZER: dict[str, Any] = {
    "method": "newton", "pretrain_iters": 0, "iters": 100, "curvature": "gauss_newton",
    "damping_rule": "levenberg_marquardt", "damping": 1e-2, "preconditioner": "fisher",
    "warm_start": "previous", "cg_rtol": 0.1, "cg_max_iter": 50, "cg_reorthogonalize": True,
    "trial_gradient": True, "step_rule": "armijo"}

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
    tensorboard: bool = True  # write TensorBoard event files to DIR/tensorboard
    max_loss_ratio: float = 1e3  # stop when the loss exceeds this times the start loss (0 = off)
    progress_seconds: float = 5.0  # iterations longer than this show CG progress (0 = never)
    reuse_memory: bool = True  # keep freed memory for the next step's arrays (mpinewton.memory)

    def __post_init__(self) -> None:
        require(self, "max_loss_ratio", ">= 0")
        require(self, "progress_seconds", ">= 0")


@dataclass(frozen=True)
class DataConfig:
    """Which HDF5 dataset to train on (format: docs/data.md)."""

    path: str = "data/mnist.h5"  # HDF5 dataset written by `python -m mpinewton.data`
    train_splits: tuple[str, ...] = ("train",)  # splits trained on, concatenated
    eval_splits: tuple[str, ...] = ("validation",)  # splits whose accuracy is reported
    limit: int = 0  # use only the first `limit` training samples (0 = all)
    pixel_scale: float = 255.0  # uint8 inputs are x / pixel_scale (thesis 10.1); floats as stored
    preprocess: str = "scale"  # scale: uint8 x / pixel_scale | caffe: Keras' ResNet50 preprocessing
    eval_limit: int = 0  # final accuracies on at most this many samples per split (0 = all)

    def __post_init__(self) -> None:
        require(self, "limit", "int >= 0")
        require(self, "pixel_scale", "> 0")
        require(self, "preprocess", "choice", choices=PREPROCESSES)
        require(self, "eval_limit", "int >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build (see mpinewton.models)."""

    name: str = "thesis_cnn"  # thesis_cnn | mlp | resnet50 | resnet_mini (unused with factory)
    factory: str = ""  # "package.module:function" building the model from [model.args]
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    dtype: str = "float64"  # float32 | float64
    input_shape: tuple[int, ...] = (28, 28, 1)  # sample shape of the built-in models (H, W, C)
    hidden: tuple[int, ...] = (32,)  # hidden layer widths for the mlp model
    num_classes: int = 10  # output classes of the built-in models
    weights: str = ""  # start from these weights (Keras .weights.h5 or mpinewton weights.h5)
    perturb_std: float = 0.0  # thesis 15.3: start from w * p, p ~ N(1, perturb_std) elementwise

    def __post_init__(self) -> None:
        require(self, "name", "choice", choices=MODEL_NAMES)
        if self.factory and (self.factory.count(":") != 1 or not all(
                part.strip() for part in self.factory.split(":"))):
            raise ParameterError("ModelConfig", "factory", self.factory,
                                 'a "package.module:function" path')
        require(self, "dtype", "choice", choices=DTYPES)
        require(self, "num_classes", "int >= 1")
        require(self, "perturb_std", ">= 0")


@dataclass(frozen=True)
class ObjectiveConfig:
    """How the per-rank sums are computed (see mpinewton.local)."""

    loss: str = "categorical_crossentropy"  # one of LOSSES, or "keras:<name>" for any Keras loss
    from_logits: bool = False  # the model outputs logits (the numerically stable cross-entropy)
    # samples per compiled call; bounds per-rank memory. 500: the thesis CNN's products are
    # 30-40 % faster than on 2,000 (cache-sized activations; docs/benchmarks.md)
    micro_batch: int = 500
    jit: bool = True  # compile with XLA (measured faster on CPU, docs/benchmarks.md)
    hvp: str = "reverse_over_reverse"  # reverse_over_reverse | forward_over_reverse

    def __post_init__(self) -> None:
        if not self.loss.removeprefix(KERAS_LOSS_PREFIX) or self.loss == self.loss.removeprefix(
                KERAS_LOSS_PREFIX):
            require(self, "loss", "choice", choices=LOSSES)
        require(self, "micro_batch", "int >= 1")
        require(self, "hvp", "choice", choices=HVP_MODES)


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Thesis Algorithm 4's schedule, and the hyper-parameters of the chosen method.

    A job's ``[optimizer]`` table holds the schedule keys below and, beside
    them, the fields of the method's own configuration dataclass
    (``solvers.NewtonConfig`` for ``newton``, ``solvers.GDConfig`` for
    ``gd``): the solvers' dataclasses validate them, there is no copy here.
    Pre-training is gradient descent with a fixed ``pretrain_lr``.
    """

    method: str = "newton"  # one of solvers.METHODS (newton, trust_region, gd, momentum, ...)
    batch_size: int = 0  # samples per iteration, drawn afresh each time (thesis 8.2); 0 = all
    iters: int = 20  # iterations of the method after pre-training
    pretrain_iters: int = 60  # gradient-descent pre-training iterations
    pretrain_lr: float = 1.0  # learning rate of pre-training
    gtol: float = 0.0  # stop once |g| <= gtol (on the batch, with mini-batches); 0 = never
    curvature_fraction: float = 1.0  # part of the batch the curvature products use, in (0, 1]
    # "damping": the fraction doubles while Levenberg-Marquardt damping stays high (no effect
    # with curvature_fraction = 1 or a method without LM damping, as curvature_fraction has none
    # for a method without curvature)
    curvature_growth: str = "none"
    curvature_growth_threshold: float = 2.0  # ... above this many times its initial value
    curvature_fraction_max: float = 1.0  # it grows to at most this, in (0, 1] (<= fraction: never)
    # "norm_test": grow mini-batches by the norm test (BBN 2018); "geometric": multiply them
    # by batch_factor every batch_every steps of the method (Friedlander & Schmidt 2012)
    batch_growth: str = "none"
    batch_theta: float = 0.9  # the norm test's theta > 0: smaller grows batches sooner
    batch_every: int = 0  # geometric: steps of the method between growths (>= 1)
    batch_factor: float = 2.0  # geometric: the factor, > 1 (2: doublings reuse compiled shapes)
    batch_max: int = 0  # batches grow to at most this many samples; 0 = all of them
    # the model is the exponential average of the method's iterates with this decay, in [0, 1)
    # (mini-batches: less of the batches' noise; Polyak & Juditsky 1992); 0 = the last iterate
    average: float = 0.0
    params: Any = None  # the method's configuration (its config_class); None = its defaults

    def __post_init__(self) -> None:
        require(self, "method", "choice", choices=tuple(METHODS))
        require(self, "batch_size", "int >= 0")
        require(self, "iters", "int >= 0")
        require(self, "pretrain_iters", "int >= 0")
        require(self, "pretrain_lr", "> 0")
        require(self, "gtol", ">= 0")
        require(self, "curvature_fraction", "> 0")
        if self.curvature_fraction > 1:
            raise ParameterError("OptimizerConfig", "curvature_fraction", self.curvature_fraction,
                                 "a number in (0, 1]")
        require(self, "curvature_growth", "choice", choices=CURVATURE_GROWTH)
        require(self, "curvature_growth_threshold", "> 0")
        if self.curvature_growth_threshold <= 1:
            raise ParameterError("OptimizerConfig", "curvature_growth_threshold",
                                 self.curvature_growth_threshold, "a number > 1")
        require(self, "curvature_fraction_max", "> 0")
        if self.curvature_fraction_max > 1:
            raise ParameterError("OptimizerConfig", "curvature_fraction_max",
                                 self.curvature_fraction_max, "a number in (0, 1]")
        require(self, "batch_growth", "choice", choices=BATCH_GROWTH)
        require(self, "batch_theta", "> 0")
        require(self, "batch_every", "int >= 0")
        require(self, "batch_factor", "> 0")
        if self.batch_factor <= 1:
            raise ParameterError("OptimizerConfig", "batch_factor", self.batch_factor,
                                 "a number > 1 (batches only grow)")
        if self.batch_growth == "geometric" and self.batch_every < 1:
            raise ParameterError("OptimizerConfig", "batch_every", self.batch_every,
                                 "the steps between growths, >= 1, with batch_growth = "
                                 "'geometric'")
        require(self, "batch_max", "int >= 0")
        require(self, "average", ">= 0")
        if self.average >= 1:
            raise ParameterError("OptimizerConfig", "average", self.average,
                                 "a decay in [0, 1) (0 = no averaging)")
        if self.batch_growth != "none" and self.batch_size == 0:
            raise ParameterError("OptimizerConfig", "batch_growth", self.batch_growth,
                                 "'none' for full-batch runs (optimizer.batch_size = 0)",
                                 BATCH_GROWTH)
        config_class = METHODS[self.method].config_class
        if self.params is None:
            object.__setattr__(self, "params", config_class())
        elif not isinstance(self.params, config_class):
            raise ValueError(f"OptimizerConfig.params must be a {config_class.__name__} for "
                             f"method {self.method!r}, got {type(self.params).__name__}")

    def table(self) -> dict[str, Any]:
        """The flat ``[optimizer]`` table: schedule keys, then the method's keys."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        return {**own, **dataclasses.asdict(self.params)}


@dataclass(frozen=True)
class EvalConfig:
    """Validation during training: loss and metrics every few iterations, best weights."""

    every: int = 0  # evaluate on eval.split every `every` iterations (0 = only at the end)
    split: str = ""  # the validation split; empty = the first of data.eval_splits
    patience: int = 0  # stop after this many evaluations without improvement (0 = never)
    min_delta: float = 0.0  # an improvement lowers the best validation loss by more than this
    keep_best: bool = True  # keep the weights of the best validation loss in DIR/best

    def __post_init__(self) -> None:
        require(self, "every", "int >= 0")
        require(self, "patience", "int >= 0")
        require(self, "min_delta", ">= 0")


@dataclass(frozen=True)
class ThreadsConfig:
    """TensorFlow thread pools per rank, set before TensorFlow starts."""

    intra_op: int = 0  # 0 = cores on this node / ranks on this node
    inter_op: int = 1  # inter-op pool size

    def __post_init__(self) -> None:
        require(self, "intra_op", "int >= 0")
        require(self, "inter_op", "int >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    """When rank 0 writes HDF5 checkpoints into DIR/checkpoints (docs/checkpoints.md)."""

    every: int = 0  # also checkpoint every `every` iterations (0 = only at the end and on signal)
    keep: int = 3  # keep the last `keep` checkpoints

    def __post_init__(self) -> None:
        require(self, "every", "int >= 0")
        require(self, "keep", "int >= 1")


@dataclass(frozen=True)
class JobConfig:
    """A whole job: one TOML file, one table per section."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    #: What loading left out (keys of another method), for rank 0 to print; not part of the job.
    notes: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The job as plain TOML-compatible tables."""
        tables = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in fields(self)
                  if f.name != "notes"}
        tables["optimizer"] = self.optimizer.table()
        return {section: {k: (list(v) if isinstance(v, tuple) else v) for k, v in table.items()}
                for section, table in tables.items()}

    def to_toml(self) -> str:
        """The job as a TOML document that :func:`load_job` reads back unchanged."""
        lines: list[str] = []
        for section, table in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items()
                         if not isinstance(value, dict))
            lines.append("")
            for key, value in table.items():  # sub-tables ([model.args]) after the keys
                if isinstance(value, dict):
                    lines.append(f"[{section}.{key}]")
                    lines.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
                    lines.append("")
        return "\n".join(lines)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: identifies the resolved job."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
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


def _defaults(cls: type) -> dict[str, Any]:
    instance = cls()
    return {f.name: getattr(instance, f.name) for f in fields(cls)}


def _coerce(section: str, key: str, value: Any, default: Any, where: str) -> Any:
    """Check one value's type against the field default and convert lists to tuples.

    Types only: the ranges and option lists are checked by the dataclasses.
    """
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
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
        value = dict(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(
            f"{where}: {section}.{key} = {value!r} has the wrong type; "
            f"expected {expected.__name__} like {default!r}")
    return value


def _construct(cls: type, values: dict[str, Any], section: str, where: str) -> Any:
    """``cls(**values)``, its :class:`ParameterError` turned into a ConfigError naming the key."""
    try:
        return cls(**values)
    except ParameterError as exc:
        hint = (f"; did you mean {_nearest(str(exc.value), list(exc.choices))!r}?"
                if exc.choices else "")
        raise ConfigError(f"{where}: {section}.{exc.name} = {exc.value!r} must be "
                          f"{exc.need}{hint}") from None


def _unknown_key(section: str, key: str, valid: list[str], where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown key {section}.{key}; did you mean "
                       f"{section}.{_nearest(key, valid)}?")


def _build_optimizer(table: dict[str, Any], where: str,
                     notes: list[str]) -> OptimizerConfig:
    """The ``[optimizer]`` table: schedule keys, and the method's keys for its dataclass.

    A key of another method (``damping`` in a job switched to ``gd`` by
    ``--set optimizer.method=gd``) is checked against that method's
    dataclass and left out, with a note; any other key is an error.
    """
    schedule = {k: v for k, v in _defaults(OptimizerConfig).items() if k != "params"}
    method = _coerce("optimizer", "method", table.get("method", schedule["method"]),
                     schedule["method"], where)
    if method not in METHODS:
        _construct(OptimizerConfig, {"method": method}, "optimizer", where)  # raises
    params = _defaults(METHODS[method].config_class)
    others = {name: _defaults(cls.config_class) for name, cls in METHODS.items()
              if name != method}
    own: dict[str, Any] = {}
    hyper: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in table.items():
        if key in schedule:
            own[key] = _coerce("optimizer", key, value, schedule[key], where)
        elif key in params:
            hyper[key] = _coerce("optimizer", key, value, params[key], where)
        elif owners := [name for name, keys in others.items() if key in keys]:
            _coerce("optimizer", key, value, others[owners[0]][key], where)
            ignored.append(key)
        else:
            known = {*schedule, *params, *(k for keys in others.values() for k in keys)}
            raise _unknown_key("optimizer", key, sorted(known), where)
    if ignored:
        notes.append(f"optimizer.{', '.join(ignored)} belong to another method than "
                     f"{method!r} (optimizer.method) and are ignored")
    own["params"] = _construct(METHODS[method].config_class, hyper, "optimizer", where)
    return _construct(OptimizerConfig, own, "optimizer", where)


def build_job(tables: dict[str, Any], where: str = "job") -> JobConfig:
    """Build a :class:`JobConfig` from parsed TOML tables, checking every key."""
    classes = _section_classes()
    sections: dict[str, Any] = {}
    notes: list[str] = []
    for section, table in tables.items():
        if section not in classes:
            raise ConfigError(
                f"{where}: unknown section [{section}]; did you mean "
                f"[{_nearest(section, list(classes))}]? Valid sections: {', '.join(classes)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table, got {table!r}")
        if section == "optimizer":
            sections[section] = _build_optimizer(table, where, notes)
            continue
        defaults = _defaults(classes[section])
        values = {}
        for key, value in table.items():
            if key not in defaults:
                raise _unknown_key(section, key, list(defaults), where)
            values[key] = _coerce(section, key, value, defaults[key], where)
        sections[section] = _construct(classes[section], values, section, where)
    if "optimizer" in sections:
        sections["optimizer"] = without_trial_gradient_on_batches(sections["optimizer"], notes)
        note_curvature_growth_on_batches(sections["optimizer"], notes)
    return JobConfig(**sections, notes=tuple(notes))


def note_curvature_growth_on_batches(opt: OptimizerConfig, notes: list[str]) -> None:
    """A note when ``curvature_growth`` reads the damping of mini-batch steps.

    The rule grows the curvature sample when Levenberg-Marquardt damping
    stays high, which on the full batch means the small sample no longer
    predicts the loss. On mini-batches the damping also rises with the
    batches' noise, and a larger sample does not help against that: on
    batches of 10,000 of the thesis CNN it doubled the sample after 44 steps,
    which cost 44 % of the steps for a similar loss (docs/results.md). The
    setting is kept; the note says so.
    """
    if opt.batch_size and opt.curvature_growth != "none" and opt.curvature_fraction < 1:
        notes.append("optimizer.curvature_growth with mini-batches (optimizer.batch_size): "
                     "the damping it reads also rises with the batches' noise, and the "
                     "curvature sample then grows without helping (docs/results.md); "
                     "curvature_growth = \"none\" keeps it fixed")


def without_trial_gradient_on_batches(opt: OptimizerConfig, notes: list[str],
                                      batch_size: int | None = None) -> OptimizerConfig:
    """``opt`` with Newton's ``trial_gradient`` off when steps draw mini-batches (a note).

    The gradient kept at the trial point is on the step's own batch; the
    next step draws a new one and needs its own, so keeping it would cost a
    backward pass for nothing. ``batch_size`` (default: ``opt``'s) is the
    size the steps draw.
    """
    batch = opt.batch_size if batch_size is None else batch_size
    if not batch or not getattr(opt.params, "trial_gradient", False):
        return opt
    notes.append("optimizer.trial_gradient is off: with mini-batches (optimizer.batch_size) "
                 "each step draws a new batch, so the gradient at the trial point would "
                 "be wasted")
    return dataclasses.replace(opt, params=dataclasses.replace(opt.params,
                                                               trial_gradient=False))


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
        table, *subkeys = key.split(".")
        if subkeys:  # model.args.units=64: a key of the [model.args] sub-table
            sub = tables[section].setdefault(table, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"--set {item!r}: {section}.{table} is not a table")
            sub[".".join(subkeys)] = value
        else:
            tables[section][key] = value
    return build_job(tables, where=str(job_path))
