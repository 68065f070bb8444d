"""The environment of the jobs the tests launch (tests/mpijobs.py): scikit-learn is
hidden from them and from the test processes (tests/no_sklearn), and only the
docs/examples' jobs, which load its data sets, see it; matplotlib is hidden from
them (tests/no_matplotlib) but for the jobs that draw figures."""

import importlib
import os
import subprocess
import sys

import pytest
from mpijobs import NO_MATPLOTLIB, NO_SKLEARN, ROOT, mpi_env, pythonpath

HIDDEN = "hidden from this test job"


def _import(env, module="sklearn"):
    return subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_job_cannot_import_scikit_learn():
    proc = _import(mpi_env())
    assert proc.returncode != 0 and HIDDEN in proc.stderr, proc.stderr


def test_a_test_process_cannot_either():
    with pytest.raises(ImportError, match=HIDDEN):
        importlib.import_module("sklearn")


def test_an_example_job_can():
    """The test extras install scikit-learn (pyproject.toml) for docs/examples."""
    env = mpi_env(sklearn=True)
    assert str(NO_SKLEARN) not in env["PYTHONPATH"].split(os.pathsep)
    proc = _import(env)
    assert proc.returncode == 0, proc.stderr


def test_a_job_cannot_import_matplotlib_unless_it_draws():
    proc = _import(mpi_env(), "matplotlib.pyplot")
    assert proc.returncode != 0 and "hidden from this test job" in proc.stderr, proc.stderr
    env = mpi_env(matplotlib=True)
    assert str(NO_MATPLOTLIB) not in env["PYTHONPATH"].split(os.pathsep)
    proc = _import(env, "matplotlib.pyplot")
    assert proc.returncode == 0, proc.stderr


def test_a_job_without_matplotlib_still_imports_tensorflow():
    """Keras takes the hidden matplotlib for one not installed."""
    code = "import sys, tensorflow, keras; assert 'matplotlib' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=mpi_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_pythonpath_puts_the_given_folders_before_the_repository():
    assert pythonpath("a", "b").split(os.pathsep) == [str(NO_SKLEARN), str(NO_MATPLOTLIB), "a",
                                                      "b", str(ROOT)]
    assert pythonpath("a", sklearn=True).split(os.pathsep) == [str(NO_MATPLOTLIB), "a",
                                                               str(ROOT)]
    assert pythonpath("a", sklearn=True, matplotlib=True).split(os.pathsep) == ["a", str(ROOT)]
