"""What a benchmark or a race ran on: the machine's facts, kept beside its figures.

Timings depend on the CPU's vector units as much as on its clock: TensorFlow
uses oneDNN's kernels by default only on CPUs with AVX-512 (VNNI, BF16) or
AMX, and mpinewton turns them on everywhere (``TF_ENABLE_ONEDNN_OPTS``, set in
:mod:`mpinewton`). Both facts go into every JSON of figures, so that two
files from different hosts are not compared as if from one.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """The CPU's model name and its AVX-512 and AMX flags (Linux ``/proc/cpuinfo``).

    ``("", [])`` where the file is absent or says nothing.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "", []
    model, flags = "", []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = sorted(f for f in value.split() if f.startswith(("avx512", "amx")))
    return model, flags


def describe() -> dict[str, Any]:
    """Platform, CPU model, cores, vector extensions, Python, TensorFlow, oneDNN."""
    import tensorflow as tf

    model, flags = cpu_model()
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu": model, "cpu_flags": flags, "cpus": os.cpu_count(),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")}
