"""Keras weights <-> one flat vector ``w`` (the ``w`` of the thesis' c(w))."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np


@dataclass(frozen=True)
class ParamLayout:
    """Where each trainable variable lives in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of entries of each variable."""
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def size(self) -> int:
        """n, the total number of trainable weights."""
        return sum(self.sizes)

    @classmethod
    def of(cls, model: keras.Model) -> ParamLayout:
        """The layout of ``model.trainable_variables``, in that order."""
        variables = model.trainable_variables
        return cls(names=tuple(v.path for v in variables),
                   shapes=tuple(tuple(int(d) for d in v.shape) for v in variables),
                   dtype=str(variables[0].dtype) if variables else "float32")

    def split(self, w: np.ndarray) -> list[np.ndarray]:
        """Cut a flat vector into arrays shaped like the variables."""
        if w.shape != (self.size,):
            raise ValueError(f"flat weight vector has shape {w.shape}, expected ({self.size},)")
        out, offset = [], 0
        for shape, size in zip(self.shapes, self.sizes, strict=True):
            out.append(w[offset:offset + size].reshape(shape))
            offset += size
        return out


def get_flat(model: keras.Model) -> np.ndarray:
    """All trainable weights as one contiguous vector."""
    variables = model.trainable_variables
    return np.concatenate([np.asarray(v.numpy()).reshape(-1) for v in variables])


def set_flat(model: keras.Model, w: np.ndarray) -> None:
    """Assign a flat vector to the model's trainable variables."""
    layout = ParamLayout.of(model)
    for var, value in zip(model.trainable_variables, layout.split(np.asarray(w)), strict=True):
        var.assign(value.astype(var.dtype))
