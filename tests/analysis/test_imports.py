import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_analysis_loads_no_tensorflow_mpi_h5py_or_scipy():
    code = ("import sys, mpinewton.analysis\n"
            "print(sorted({'tensorflow', 'keras', 'mpi4py', 'h5py', 'scipy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
