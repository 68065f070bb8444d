"""Every BLAS a rank computes with gets its share of the cores (``threads_for``)."""

import json
import os
import subprocess
import sys

from mpijobs import ROOT, pythonpath

#: In a fresh process without scikit-learn (which Keras would load, and scipy with it):
#: limit the pools, then run scipy's LAPACK as K-FAC's inversions do, and report the
#: threads of every BLAS loaded by then.
PROBE = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
from mpinewton.train.session import threads_for
threads_for(int(sys.argv[1]), 1)
from scipy.linalg import lapack
lapack.dpotrf(np.eye(64) * 2.0)
print(json.dumps([(i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas"]))
"""


def test_scipys_blas_loaded_after_the_limit_is_limited_too():
    """scipy's own OpenBLAS (K-FAC's factor inversions), loaded by its first use after
    ``threads_for``, runs on the rank's threads, not on one a core (which oversubscribed
    the node and rounded the first job of a process unlike its later ones)."""
    limit = 1 if (os.cpu_count() or 1) > 1 else 2  # not the libraries' default of a core each
    env = dict(os.environ, PYTHONPATH=pythonpath(), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(limit)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    libraries = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("scipy" in path and "numpy" not in path for path, _ in libraries), libraries
    assert libraries and all(threads == limit for _, threads in libraries), libraries
