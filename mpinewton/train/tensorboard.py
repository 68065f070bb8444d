"""TensorBoard event files of a training run (``run.tensorboard``), written by rank 0.

``DIR/tensorboard/`` holds the events of TensorFlow's own
``tf.summary.create_file_writer``: per iteration the scalars of
:data:`ITERATION_SCALARS` that the step recorded (``damping`` only for
methods that have one), per evaluation the ``val_*`` scalars of the
``metrics.jsonl`` record; the step of every scalar is the iteration.
``tensorboard --logdir runs/`` shows them. The values are those of
``metrics.jsonl`` (as float32, which TensorBoard stores). Each scalar is
written by ``tf.summary.write`` with the scalar plugin's metadata -- the
record ``tf.summary.scalar`` writes -- because ``tf.summary.scalar`` needs
the ``tensorboard`` package, which TensorFlow no longer installs (so
writing costs no new dependency; viewing needs ``pip install
tensorboard``, anywhere). Events are flushed
every :data:`FLUSH_SECONDS` and at checkpoints, and the file is closed at the
end of the run, also after an error.  A resumed run adds its own event file;
after a crash the iterations between the last checkpoint and the crash
appear in both files (a signal checkpoints the last iteration: no overlap).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

#: The metrics.jsonl fields of an iteration that become TensorBoard scalars.
ITERATION_SCALARS = ("loss", "grad_norm", "step_size", "cg_iters", "damping", "iter_seconds",
                     "hvps")
#: Flush the event file at least this often (seconds) while a run goes on.
FLUSH_SECONDS = 10.0


def _scalar_metadata() -> bytes:
    """TensorBoard's scalar-plugin metadata (``tensorboard.plugins.scalar.metadata``)."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"  # content: ScalarPluginData(version=0) = b""
    metadata.data_class = summary_pb2.DATA_CLASS_SCALAR
    return metadata.SerializeToString()


def _scalar(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not None, not a bool), else None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class TensorBoardLog:
    """Rank 0's event writer in ``folder``; every method does nothing when disabled."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._writer: Any = None
        self._flushed = time.monotonic()
        if folder is not None:
            import tensorflow as tf

            folder.mkdir(parents=True, exist_ok=True)
            self._writer = tf.summary.create_file_writer(str(folder))
            self._metadata = _scalar_metadata()

    @property
    def enabled(self) -> bool:
        """True while events are written (rank 0 with ``run.tensorboard``, until closed)."""
        return self._writer is not None

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        import tensorflow as tf

        with self._writer.as_default(step=step):
            for tag, value in scalars.items():
                tf.summary.write(tag, tf.constant(value, tf.float32), metadata=self._metadata)
        if time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def iteration(self, record: dict[str, Any]) -> None:
        """The scalars of one iteration's metrics record (those it holds)."""
        if self._writer is None:
            return
        scalars = {tag: value for tag in ITERATION_SCALARS
                   if (value := _scalar(record.get(tag))) is not None}
        self._write(int(record["iter"]), scalars)

    def evaluation(self, record: dict[str, Any]) -> None:
        """The ``val_*`` scalars of one evaluation record."""
        if self._writer is None:
            return
        scalars = {tag: value for tag, raw in record.items() if tag.startswith("val_")
                   and (value := _scalar(raw)) is not None}
        self._write(int(record["iter"]), scalars)

    def flush(self) -> None:
        """Write buffered events to disk."""
        if self._writer is not None:
            self._writer.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``folder``: tag -> [(step, value), ...] in file order.

    For tests and quick looks without TensorBoard's server.
    """
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(raw.numpy())
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                    else float(value.simple_value)
                out.setdefault(value.tag, []).append((int(event.step), number))
    return out


__all__ = ["FLUSH_SECONDS", "ITERATION_SCALARS", "TensorBoardLog", "read_scalars"]
