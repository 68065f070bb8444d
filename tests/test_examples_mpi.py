"""docs/examples/ run under mpirun, so that nothing in the docs goes stale.

- ``fit_arrays.py``: a user's functional model (biases, batch norm, dropout) trained
  by ``mpinewton.fit`` on in-memory arrays, on 1 and 3 ranks: the same weights.
- ``digits.toml``: the same model through a job file (``model.factory``) and the
  command line on 2 ranks, on data made by ``python -m mpinewton.data import``: the
  same weights as the API on arrays.

(Each rank's start costs 6-7 CPU-seconds of TensorFlow's import, most of what these
tests cost: three rank counts across the two paths, not three for each.)
- ``diabetes_regression.py``: squared-error regression, with scipy's L-BFGS on the
  same model and data.

Every launch runs under a hard timeout; the launches of a test run side by side.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from mpijobs import ROOT, mpi_env, mpirun, pythonpath, read_metrics, read_weights, requires_mpirun

pytestmark = requires_mpirun
EXAMPLES = ROOT / "docs" / "examples"
TIMEOUT = 400


def launch(ranks, *args, cwd, env=None):
    """The examples load scikit-learn's data sets: their jobs start with it importable."""
    return subprocess.Popen(mpirun(ranks, *args), cwd=cwd, env=env or mpi_env(sklearn=True),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc):
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"timed out: {proc.args}\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)



@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """fit_arrays.py on 1 and 3 ranks, and digits.toml through the CLI on 2 ranks."""
    work = tmp_path_factory.mktemp("digits")
    prep = subprocess.run([sys.executable, EXAMPLES / "make_digits.py", "data/digits.npz"],
                          cwd=work, env=mpi_env(sklearn=True), capture_output=True, text=True,
                          timeout=120)
    assert prep.returncode == 0, prep.stderr
    imp = subprocess.run([sys.executable, "-m", "mpinewton.data", "import", "data/digits.npz",
                          "--out", "data/digits.h5"], cwd=work, env=mpi_env(),
                         capture_output=True, text=True, timeout=120)
    assert imp.returncode == 0, imp.stderr
    procs = {ranks: launch(ranks, EXAMPLES / "fit_arrays.py", work / f"api{ranks}", cwd=work)
             for ranks in (1, 3)}
    # the job file names the factory digits_model:build, importable from docs/examples;
    # the same validation schedule as fit_arrays.py, so both stop at the same iteration
    cli_env = mpi_env(PYTHONPATH=pythonpath(EXAMPLES))
    procs["cli"] = launch(2, "-m", "mpinewton.train", EXAMPLES / "digits.toml", "--run-dir",
                          work / "cli", "--set", "eval.every=5", "--set", "eval.patience=2",
                          cwd=work, env=cli_env)
    done = {key: finish(proc) for key, proc in procs.items()}
    for key, proc in done.items():
        assert proc.returncode == 0, (key, proc.stdout[-3000:], proc.stderr[-3000:])
    return work, done


def test_fit_on_arrays_learns_and_validates(digits_runs):
    work, done = digits_runs
    summary = json.loads((work / "api3" / "summary.json").read_text())
    assert summary["world_size"] == 3 and summary["validation_accuracy"] > 0.95
    assert summary["train_accuracy"] > summary["validation_accuracy"] - 0.05
    records = read_metrics(work / "api3")
    evals = [r for r in records if r["phase"] == "eval"]
    assert evals and all(r["iter"] % 5 == 0 for r in evals)
    assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)
    # the script prints on rank 0 only
    assert sum(line.startswith("final loss") for line in done[3].stdout.splitlines()) == 1
    assert "validation accuracy" in done[3].stdout


def test_fit_gives_the_same_weights_on_1_and_3_ranks(digits_runs):
    work, _ = digits_runs
    w1, w3 = read_weights(work / "api1"), read_weights(work / "api3")
    assert np.linalg.norm(w3 - w1) <= 1e-10 * np.linalg.norm(w1)


def test_factory_job_through_the_cli_equals_the_api(digits_runs):
    work, _ = digits_runs
    cli, api = work / "cli", work / "api1"
    assert "[model.args]" in (cli / "config.toml").read_text()
    assert [r["iter"] for r in read_metrics(cli)] == [r["iter"] for r in read_metrics(api)]
    w_cli, w_api = read_weights(cli), read_weights(api)
    assert np.linalg.norm(w_cli - w_api) <= 1e-10 * np.linalg.norm(w_api)
    s_cli = json.loads((cli / "summary.json").read_text())
    s_api = json.loads((api / "summary.json").read_text())
    assert s_cli["validation_accuracy"] == s_api["validation_accuracy"]


def test_diabetes_regression_against_scipy_lbfgs(tmp_path):
    out = tmp_path / "diabetes.json"
    proc = finish(launch(2, EXAMPLES / "diabetes_regression.py", tmp_path / "run", "--iters",
                         "30", "--lbfgs-iters", "300", "--json", out, cwd=tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["samples"] == 442 and result["ranks"] == 2
    newton, lbfgs = result["newton"], result["lbfgs"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert newton["final_loss"] == summary["final_loss"] and "train_mae" in summary
    first = read_metrics(tmp_path / "run")[0]["loss"]
    assert newton["final_loss"] < 0.6 * first  # standardised targets: the start is about 1
    assert 0 < lbfgs["final_loss"] < first and lbfgs["iterations"] > 0
    assert proc.stdout.count("Newton-CG: loss") == 1


def test_the_readme_starts_with_a_working_example(tmp_path):
    """The README's first code block runs as it stands, given arrays x, y, xv, yv."""
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("# mpinewton\n\n```python\n")
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 12
    script = tmp_path / "readme_example.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(EXAMPLES)!r})\n"
        + "from fit_arrays import digits\n"
        + "(x, y), (xv, yv) = digits()['train'], digits()['validation']\n" + block)
    proc = finish(launch(2, script, cwd=tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("0.")]
    assert len(printed) == 1  # rank 0 prints
    accuracy = float(printed[0])
    summary = json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())
    assert accuracy == summary["validation_accuracy"] > 0.9
