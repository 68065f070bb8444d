"""The sbatch templates (slurm/*.sh) on a real single-node SLURM (conftest.py).

Whole training jobs: the MNIST template runs to the end under ``srun
--mpi=pmix`` and under ``mpirun``; a job sent SIGUSR1 checkpoints, exits with
code 75, requeues itself and ends with the same weights as the uninterrupted job. With a stand-in
trainer (no TensorFlow, seconds per job): signal forwarding and requeue under
both launchers, the requeue cap, a missing job file. And the trainer's refusal
of ``srun`` without PMIx (N one-rank worlds instead of one N-rank world).
"""

import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

MNIST = "slurm/mnist_cnn.sh"
RESNET = "slurm/resnet.sh"
EXIT_CHECKPOINTED = 75
# Two ranks on this machine's cores instead of 28 per node; sbatch's command line
# overrides the template's #SBATCH lines.
# 30 minutes: longer than resnet.sh's --signal=B:USR1@900, which would otherwise signal
# a job at once (SLURM sends it 15 minutes before the end of the time limit)
SMALL = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--time=30"]

pytestmark = pytest.mark.slow


def _trainer_args(dataset):
    """A short job: 2 pre-training + 4 Newton iterations on 600 images, checkpoints every step."""
    return " ".join([
        f'--set data.path="{dataset}"', "--set optimizer.pretrain_iters=2",
        "--set optimizer.iters=4", "--set data.limit=2000", "--set checkpoint.every=1",
        "--set objective.micro_batch=300", "--set objective.jit=false",
        '--set data.eval_splits=["validation"]', "--set optimizer.pretrain_lr=0.5"])


def _venv():
    """The virtualenv running these tests, for the template to activate ('' = none)."""
    return sys.prefix if sys.prefix != sys.base_prefix else ""


def _submit(slurm, script, tmp, run_dir, *, extra_env=None, sbatch_args=(), trainer_args=""):
    env = slurm.env(MPINEWTON_VENV=_venv(), MPINEWTON_RUN_DIR=run_dir,
                    MPINEWTON_EXTRA_ARGS=trainer_args, **(extra_env or {}))
    job_id = slurm.sbatch(script, *SMALL, f"--output={tmp}/slurm-%j.out", *sbatch_args, env=env)
    return job_id, Path(tmp) / f"slurm-{job_id}.out"


def _read(path):
    return Path(path).read_text(errors="replace") if Path(path).exists() else "(no output)"


def _weights(run_dir):
    with h5py.File(Path(run_dir) / "weights.h5") as f:
        return f["w"][...]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text()
            .splitlines()]


def _wait_for_records(slurm, job_id, run_dir, count, out, timeout=180):
    path = Path(run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        state = slurm.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state}:\n{_read(out)}"
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {count} records:\n{_read(out)}")


@pytest.fixture(scope="session")
def reference(slurm, slurm_dataset, tmp_path_factory):
    """The short job, uninterrupted, through slurm/mnist_cnn.sh and srun --mpi=pmix."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run"
    t0 = time.monotonic()
    job_id, out = _submit(slurm, MNIST, tmp, run_dir, trainer_args=_trainer_args(slurm_dataset))
    fields = slurm.wait_done(job_id, timeout=240)
    return fields, run_dir, out, time.monotonic() - t0


@pytest.mark.timeout(330)
def test_mnist_template_runs_to_completion(reference):
    fields, run_dir, out, seconds = reference
    log = _read(out)
    assert fields["JobState"] == "COMPLETED", log
    assert fields["ExitCode"] == "0:0" and fields["Restarts"] == "0", log
    assert "srun --mpi=pmix" in log and "--resume" in log, log
    assert "trainer exited with code 0" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["threads_per_rank"] == 1
    assert summary["iterations"] == 6 and summary["resumed_from"] is None
    assert [m["iter"] for m in _metrics(run_dir)] == list(range(1, 7))
    assert np.all(np.isfinite(_weights(run_dir)))
    print(f"uninterrupted job: {seconds:.1f} s from sbatch to the end")


@pytest.mark.timeout(330)
def test_mnist_template_with_mpirun(slurm, slurm_dataset, reference, tmp_path):
    _, ref_dir, _, _ = reference
    run_dir = tmp_path / "run"
    job_id, out = _submit(slurm, MNIST, tmp_path, run_dir,
                          trainer_args=_trainer_args(slurm_dataset),
                          extra_env={"MPINEWTON_LAUNCHER": "mpirun"})
    fields = slurm.wait_done(job_id, timeout=240)
    log = _read(out)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log
    assert "running: mpirun -n 2 " in log, log
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    w, w_ref = _weights(run_dir), _weights(ref_dir)
    # Same number of ranks, same reduction order: bitwise the same weights.
    np.testing.assert_array_equal(w, w_ref)


@pytest.mark.timeout(480)
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, slurm_dataset, reference,
                                                       tmp_path):
    _, ref_dir, _, _ = reference
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    # Slow iterations (test hook of the trainer) so that the signal lands mid-run;
    # the sleep does not change the numbers.
    job_id, out = _submit(slurm, MNIST, tmp_path, run_dir,
                          trainer_args=_trainer_args(slurm_dataset),
                          extra_env={"MPINEWTON_TEST_ITER_SLEEP": "1.5"})
    _wait_for_records(slurm, job_id, run_dir, 2, out)
    slurm.run("scancel", "-s", "USR1", "-b", job_id)
    slurm.release_requeued(job_id, 1, timeout=120)
    fields = slurm.wait_done(job_id, timeout=300)
    log = _read(out)
    assert fields["JobState"] == "COMPLETED", log
    assert fields["ExitCode"] == "0:0" and fields["Restarts"] == "1", log
    assert "received SIGUSR1" in log and "trainer exited with code 75" in log, log
    assert "checkpointed, not finished; requeueing" in log, log
    assert "resuming from" in log and "restart 1 of at most" in log, log
    assert log.count("trainer exited with code 0") == 1, log  # appended, not truncated
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["iterations"] == 6
    assert [m["iter"] for m in _metrics(run_dir)] == list(range(1, 7))
    w, w_ref = _weights(run_dir), _weights(ref_dir)
    assert w.shape == w_ref.shape
    np.testing.assert_array_equal(w, w_ref)  # exact resume: bitwise the final weights
    assert [m["loss"] for m in _metrics(run_dir)] == [m["loss"] for m in _metrics(ref_dir)]
    print(f"interrupted job: {time.monotonic() - t0:.1f} s; final weights bitwise equal")


@pytest.mark.timeout(240)
def test_srun_without_pmix_is_refused(slurm, slurm_dataset, tmp_path):
    # Without a PMI plugin each task initialises MPI alone: two one-rank worlds.
    res = slurm.run("srun", "--mpi=none", "-n", "2", sys.executable, "-m", "mpinewton.train",
                    "--set", f'data.path="{slurm_dataset}"', "--set", "optimizer.iters=1",
                    "--run-dir", tmp_path / "run", check=False, timeout=180)
    text = res.stdout + res.stderr
    assert res.returncode == 2, text
    assert "SLURM started 2 tasks (SLURM_STEP_NUM_TASKS) but the MPI world has 1 rank" in text, text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- the template's shell logic, with a stand-in trainer -------------------------------------

FAKE_TRAINER = """\
#!{python}
# Stand-in for `python -m mpinewton.train`: prints its arguments, then sleeps in
# one-second steps; on SIGUSR1/SIGTERM the ranks agree and exit 75, like the trainer.
import os, signal, sys, time
from mpi4py import MPI

comm = MPI.COMM_WORLD
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(n))
print(f"fake rank {{comm.rank}}/{{comm.size}} started: {{' '.join(sys.argv[1:])}}", flush=True)
for _ in range(int(os.environ.get("FAKE_SECONDS", "6"))):
    time.sleep(1)
    if comm.allreduce(len(got)):
        comm.Barrier()
        sys.exit(75)
"""


@pytest.fixture
def fake_venv(tmp_path):
    """A 'virtualenv' whose python is the stand-in trainer (MPI from the real one)."""
    venv = tmp_path / "fakevenv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_TRAINER.format(python=sys.executable))
    python.chmod(0o755)
    (venv / "bin" / "activate").write_text(
        f'export PATH="{venv / "bin"}:{Path(sys.executable).parent}:$PATH"\n')
    return venv


def _submit_fake(slurm, script, tmp_path, venv, **env):
    job_env = slurm.env(MPINEWTON_VENV=venv, MPINEWTON_RUN_DIR=tmp_path / "run",
                        **{k: str(v) for k, v in env.items()})
    job_id = slurm.sbatch(script, *SMALL, f"--output={tmp_path}/slurm-%j.out", env=job_env,
                          script_args=["--set", "optimizer.iters=7"])
    return job_id, tmp_path / f"slurm-{job_id}.out"


def _wait_for_text(slurm, job_id, out, text, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in _read(out):
            return
        state = slurm.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state}:\n{_read(out)}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in the output:\n{_read(out)}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_signal_is_forwarded_and_job_requeued(slurm, fake_venv, tmp_path, launcher):
    job_id, out = _submit_fake(slurm, MNIST, tmp_path, fake_venv, MPINEWTON_LAUNCHER=launcher,
                               FAKE_SECONDS=8)
    _wait_for_text(slurm, job_id, out, "fake rank 0/2 started")
    _wait_for_text(slurm, job_id, out, "fake rank 1/2 started")
    slurm.run("scancel", "-s", "USR1", "-b", job_id)
    slurm.release_requeued(job_id, 1)
    fields = slurm.wait_done(job_id, timeout=90)
    log = _read(out)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log
    assert fields["Restarts"] == "1", log
    assert "received SIGUSR1" in log and "trainer exited with code 75" in log, log
    assert "restart 1 of at most 10" in log, log
    assert f"running: {'srun --mpi=pmix' if launcher == 'srun' else 'mpirun -n 2'}" in log, log
    assert "--resume --run-dir" in log and "--set optimizer.iters=7" in log, log
    assert log.count("fake rank 0/2 started") == 2, log


@pytest.mark.timeout(120)
def test_requeue_cap_stops_requeueing(slurm, fake_venv, tmp_path):
    job_id, out = _submit_fake(slurm, MNIST, tmp_path, fake_venv, MPINEWTON_MAX_RESTARTS=0,
                               FAKE_SECONDS=30)
    _wait_for_text(slurm, job_id, out, "fake rank 0/2 started")
    _wait_for_text(slurm, job_id, out, "fake rank 1/2 started")
    slurm.run("scancel", "-s", "USR1", "-b", job_id)
    fields = slurm.wait_done(job_id, timeout=60)
    log = _read(out)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == f"{EXIT_CHECKPOINTED}:0", log
    assert fields["Restarts"] == "0", log
    assert "requeue cap reached" in log, log


@pytest.mark.timeout(120)
def test_missing_job_file_is_a_clear_error(slurm, fake_venv, tmp_path):
    job_id, out = _submit_fake(slurm, RESNET, tmp_path, fake_venv,
                               MPINEWTON_JOB="jobs/no_such_job.toml")
    fields = slurm.wait_done(job_id, timeout=60)
    log = _read(out)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", log
    assert "jobs/no_such_job.toml" in log and "MPINEWTON_JOB" in log, log
    assert "fake rank" not in log, log


@pytest.mark.timeout(120)
def test_template_warns_when_ranks_get_no_samples(slurm, fake_venv, tmp_path):
    # The ResNet-50 job's batch of 16 on 112 ranks leaves 96 idle; here 1 of 2.
    env = slurm.env(MPINEWTON_VENV=fake_venv, MPINEWTON_RUN_DIR=tmp_path / "run",
                    FAKE_SECONDS="1")
    job_id = slurm.sbatch(RESNET, *SMALL, f"--output={tmp_path}/slurm-%j.out", env=env,
                          script_args=["--set", "optimizer.batch_size=1"])
    fields = slurm.wait_done(job_id, timeout=180)
    log = _read(tmp_path / f"slurm-{job_id}.out")
    assert fields["JobState"] == "COMPLETED", log
    assert ("warning: optimizer.batch_size = 1 (from jobs/resnet50_imagenet.toml and the "
            "trainer arguments) on 2 ranks leaves 1 of the 2 ranks without samples") in log, log
    assert log.index("warning: optimizer.batch_size") < log.index("running: "), log
