"""The sbatch templates' warning about ranks without samples (slurm/common.sh), without SLURM.

``mpinewton_check_batch NTASKS JOB ARGS...`` reads ``optimizer.batch_size``
from the job file's ``[optimizer]`` table and from ``--set`` arguments (the
last wins, as in the trainer) and warns when the batch is smaller than the
number of ranks.  The template test with a real SLURM is in test_slurm.py.
"""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _check(ntasks, job, *args):
    script = 'source slurm/common.sh && mpinewton_check_batch "$@"'
    proc = subprocess.run(["bash", "-c", script, "check", str(ntasks), str(job), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_resnet_job_on_four_nodes_warns_with_the_numbers():
    out = _check(112, "jobs/resnet50_imagenet.toml")
    assert "warning: optimizer.batch_size = 16 (from jobs/resnet50_imagenet.toml" in out
    assert "on 112 ranks leaves 96 of the 112 ranks without samples" in out
    assert "--set optimizer.batch_size=112" in out


@pytest.mark.parametrize(("ntasks", "args", "warns"), [
    (112, ["--set", "optimizer.batch_size=112"], False),
    (112, ["--set optimizer.batch_size=128"], False),  # MPINEWTON_EXTRA_ARGS split or not
    (16, [], False),
    (2, ["--set", "optimizer.batch_size=256", "--set", "optimizer.batch_size=1"], True),
])
def test_overrides_and_rank_counts(ntasks, args, warns):
    assert bool(_check(ntasks, "jobs/resnet50_imagenet.toml", *args)) == warns


def test_full_batch_jobs_and_other_tables_do_not_warn(tmp_path):
    assert _check(28, "jobs/mnist_cnn.toml") == ""  # no batch_size: the whole training set
    job = tmp_path / "job.toml"
    job.write_text("[optimizer]  # the schedule\nbatch_size = 8  # samples\n\n"
                   "[model.args]\nbatch_size = 1\n")
    out = _check(10, job)
    assert "optimizer.batch_size = 8" in out and "leaves 2 of the 10 ranks" in out
    assert _check(10, tmp_path / "missing.toml") == ""
