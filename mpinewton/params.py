"""Keras weights <-> one flat vector ``w`` (the ``w`` of the thesis' c(w)).

The one place that converts between a model's trainable variables (or a
checkpoint's arrays) and the flat vector the solvers see.  Free of TensorFlow
imports: it only reads ``model.trainable_variables``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ParamLayout:
    """The ordered trainable variables of a model: names, shapes, dtype names.

    Where each variable lives in the flat vector, and what a checkpoint must
    hold to fit the model (``mpinewton.checkpoint.ModelSpec`` is this class).
    Dtypes are normalised to numpy names (``"float32"``), shapes to tuples of
    ints, so layouts from Keras and from a checkpoint compare equal.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def __post_init__(self) -> None:
        names = tuple(self.names)
        shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        try:
            dtypes = tuple(np.dtype(d).name for d in self.dtypes)
        except TypeError as e:
            raise ValueError(f"ParamLayout: bad dtype in {self.dtypes!r}: {e}") from None
        if not (len(names) == len(shapes) == len(dtypes)):
            raise ValueError(
                f"ParamLayout: {len(names)} names, {len(shapes)} shapes and {len(dtypes)} "
                "dtypes; give one of each per variable"
            )
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"ParamLayout: names must be non-empty strings, got {name!r}")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"ParamLayout: variable name {dup!r} appears twice")
        if any(d < 0 for s in shapes for d in s):
            raise ValueError(f"ParamLayout: negative dimension in shapes {shapes}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "dtypes", dtypes)

    @classmethod
    def of(cls, model: Any) -> ParamLayout:
        """The layout of ``model.trainable_variables``, in that order."""
        variables = model.trainable_variables
        return cls(names=tuple(v.path for v in variables),
                   shapes=tuple(tuple(int(d) for d in v.shape) for v in variables),
                   dtypes=tuple(str(v.dtype) for v in variables))

    @classmethod
    def of_arrays(cls, weights: Mapping[str, Any]) -> ParamLayout:
        """The layout of an ordered ``name -> array`` mapping (a checkpoint's weights)."""
        arrays = {k: np.asarray(v) for k, v in weights.items()}
        return cls(names=tuple(arrays), shapes=tuple(a.shape for a in arrays.values()),
                   dtypes=tuple(a.dtype.name for a in arrays.values()))

    @property
    def dtype(self) -> str:
        """The dtype of the flat vector: the variables' common one (float32 if none)."""
        kinds = set(self.dtypes)
        if len(kinds) > 1:
            raise ValueError(f"variables of mixed dtypes {sorted(kinds)} have no flat vector")
        return kinds.pop() if kinds else "float32"

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of entries of each variable."""
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def size(self) -> int:
        """n, the total number of trainable weights."""
        return sum(self.sizes)

    def entries(self) -> list[list[Any]]:
        """``[[name, [dims...], dtype], ...]``: the stored variable list."""
        rows = zip(self.names, self.shapes, self.dtypes, strict=True)
        return [[n, list(s), d] for n, s, d in rows]

    def fingerprint(self) -> str:
        """SHA-256 hex of ``json.dumps(self.entries(), separators=(",", ":"))`` (UTF-8)."""
        blob = json.dumps(self.entries(), separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def mismatch(self, found: ParamLayout) -> str | None:
        """None if ``found`` fits this (expected) spec, else the first difference in words."""

        def describe(i: int, spec: ParamLayout) -> str:
            return f"{spec.names[i]!r} {spec.shapes[i]} {spec.dtypes[i]}"

        for i in range(min(len(self.names), len(found.names))):
            if (self.names[i], self.shapes[i], self.dtypes[i]) != (
                found.names[i],
                found.shapes[i],
                found.dtypes[i],
            ):
                if self.names[i] == found.names[i]:
                    return (
                        f"variable {i} {self.names[i]!r} is {found.shapes[i]} {found.dtypes[i]} "
                        f"in the checkpoint but {self.shapes[i]} {self.dtypes[i]} in the model"
                    )
                return (
                    f"variable {i} is {describe(i, found)} in the checkpoint "
                    f"but {describe(i, self)} in the model"
                )
        if len(found.names) < len(self.names):
            i = len(found.names)
            return (
                f"the checkpoint has {len(found.names)} variables, the model {len(self.names)}; "
                f"first missing: variable {i} {describe(i, self)}"
            )
        if len(found.names) > len(self.names):
            i = len(self.names)
            return (
                f"the checkpoint has {len(found.names)} variables, the model {len(self.names)}; "
                f"first extra: variable {i} {describe(i, found)}"
            )
        return None

    def split(self, w: np.ndarray) -> list[np.ndarray]:
        """Cut a flat vector into arrays shaped like the variables."""
        if w.shape != (self.size,):
            raise ValueError(f"flat weight vector has shape {w.shape}, expected ({self.size},)")
        out, offset = [], 0
        for shape, size in zip(self.shapes, self.sizes, strict=True):
            out.append(w[offset:offset + size].reshape(shape))
            offset += size
        return out

    def as_dict(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """The flat vector as ``{variable name: array}``, in layout order."""
        return dict(zip(self.names, self.split(w), strict=True))

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """One flat vector from ``{variable name: array}`` (a checkpoint's weights), by name."""
        missing = [name for name in self.names if name not in arrays]
        if missing:
            raise ValueError(f"weights lack variable {missing[0]!r} of this model")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = np.asarray(arrays[name])
            if value.shape != shape:
                raise ValueError(f"variable {name!r} has shape {value.shape}, expected {shape}")
            parts.append(value.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)


def get_flat(model: Any) -> np.ndarray:
    """All trainable weights as one contiguous vector."""
    variables = model.trainable_variables
    return np.concatenate([np.asarray(v.numpy()).reshape(-1) for v in variables])


def set_flat(model: Any, w: np.ndarray) -> None:
    """Assign a flat vector to the model's trainable variables."""
    layout = ParamLayout.of(model)
    for var, value in zip(model.trainable_variables, layout.split(np.asarray(w)), strict=True):
        var.assign(value.astype(var.dtype))
