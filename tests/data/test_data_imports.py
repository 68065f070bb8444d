"""What importing the data layer loads: no OpenCV, TensorFlow or MPI until they are needed."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

import mpinewton.data
from mpinewton.data import resize as resize_module

HEAVY = ("cv2", "tensorflow", "mpi4py")
#: Variables an MPI launcher sets (a test run under mpirun must not pass them on).
LAUNCHER_PREFIXES = ("OMPI_", "PMI", "PMIX", "SLURM_", "PRTE_", "HYDRA_")


def run_fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter outside any MPI launcher; return its JSON output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_loads_neither_opencv_nor_tensorflow_nor_mpi() -> None:
    out = run_fresh(
        "import json, sys\n"
        "import mpinewton.data, mpinewton.data.resize, mpinewton.data.__main__\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    assert out == []


def test_opencv_is_loaded_when_an_image_is_decoded(tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    pixels = np.zeros((5, 7, 3), dtype=np.uint8)
    pixels[..., 2] = 255  # BGR red
    assert cv2.imwrite(str(image), pixels)
    out = run_fresh(
        "import json, sys\n"
        "from mpinewton.data import decode_image\n"
        "before = 'cv2' in sys.modules\n"
        f"rgb, note = decode_image({str(image)!r}, 4)\n"
        "print(json.dumps([before, 'cv2' in sys.modules, rgb.shape, rgb[0, 0].tolist()]))\n"
    )
    assert out == [False, True, [4, 4, 3], [255, 0, 0]]


def test_launched_world_without_a_launcher_is_one_process_without_mpi() -> None:
    out = run_fresh(
        "import json, sys\n"
        "from mpinewton.comm import launched_world\n"
        "c = launched_world()\n"
        "print(json.dumps([c.rank, c.size, c.mpi is None, 'mpi4py' in sys.modules,\n"
        "                  c.scatter(['only'])]))\n"
    )
    assert out == [0, 1, True, False, "only"]


def test_interpolation_flags_are_opencvs() -> None:
    """resize.py writes the flags out (so importing it does not load OpenCV): they must match."""
    expected = {
        name: getattr(cv2, "INTER_" + name.upper()) for name in resize_module.INTERPOLATIONS
    }
    assert expected == resize_module.INTERPOLATIONS
    assert list(resize_module.INTERPOLATIONS) == ["nearest", "linear", "cubic", "area", "lanczos4"]


def test_no_module_of_the_package_imports_the_package_itself() -> None:
    """Modules of mpinewton.data import siblings (mpinewton.data.hdf5), never mpinewton.data."""
    folder = Path(mpinewton.data.__file__).parent
    offenders = []
    for path in sorted(folder.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = (
                    [node.module] if node.level == 0 else ["." * node.level + (node.module or "")]
                )
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n in ("mpinewton.data", ".") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
