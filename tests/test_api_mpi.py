"""mpinewton.fit's bad input under mpirun: a clear error on every rank, a non-zero exit."""

import json
import subprocess

from mpijobs import ROOT, mpi_env, mpirun, requires_mpirun

pytestmark = requires_mpirun

EXPECTED = {
    "factory": ["model.factory", "no_such_pkg.models", "cannot import"],
    "labels": ["label", "outside [0, 3)"],
    "nan": ["row 17"],
    "regression_targets": ["regression", "classification"],
    "lengths": ["40 rows", "39"],
}


def test_bad_input_to_fit_fails_on_every_rank(tmp_path):
    out = tmp_path / "errors"
    proc = subprocess.run(mpirun(2, ROOT / "tests" / "api_errors.py", out), cwd=tmp_path,
                          env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # the last case is not caught
    assert "40 rows" in proc.stderr
    ranks = [json.loads((tmp_path / f"errors.{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank reports the same error
    for case, words in EXPECTED.items():
        message = ranks[0][case]
        assert message is not None, case
        assert all(w in message for w in words), (case, message)
        assert "rank 0, 1" in message or "rank" not in message.split(":")[0], (case, message)
    # nothing was trained, so no run wrote weights
    assert not list(tmp_path.glob("runs/*/weights.h5"))
