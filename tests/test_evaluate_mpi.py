"""``python -m mpinewton.evaluate`` and ``predict`` under mpirun, on a run trained once.

A tiny job is trained on 1 rank; evaluating its run directory on 1 and 2
ranks gives the losses and accuracies of its ``summary.json`` (batch
additivity: the rank count changes only rounding); predicting on 1 rank (from
the checkpoint file) and on 3 ranks (from the run directory, 101 rows: uneven
shards) gives the same outputs, whose arg-max reproduces the summary's
accuracy. Bad input ends every rank with exit code 2 and writes nothing.

The commands run concurrently (each with a hard timeout) to keep the file fast.
"""

import json
import subprocess
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from mpijobs import ROOT, mpi_env, mpirun, requires_mpirun, run_job, small_job, start_many

from mpinewton.data import write_dataset

pytestmark = [requires_mpirun,
              pytest.mark.timeout(240)]

TIMEOUT = 150


def start(ranks, command, *args):
    """Start ``python -m mpinewton.COMMAND`` on ``ranks`` ranks (not waiting)."""
    return _popen(ranks, "-m", f"mpinewton.{command}", *args)


def _popen(ranks, *args):
    return subprocess.Popen(mpirun(ranks, *args),
                            cwd=ROOT, env=mpi_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs):
    """Wait for every started launch; name -> CompletedProcess."""
    done = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{name} did not finish in {TIMEOUT}s: {err}") from None
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert proc.returncode in (0, 2), f"{name}: {out}{err}"
    return done


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """Train once; run every command (cheap errors while training, the rest after it).

    name -> namespace(returncode, stdout, stderr of rank 0; codes: every rank's).
    """
    tmp = tmp_path_factory.mktemp("evaluate")
    run_dir = tmp / "run"
    small = tmp / "small8.h5"  # 8 x 8 images: not the model's 28 x 28
    rng = np.random.default_rng(1)
    write_dataset(small, {"train": (rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8),
                                    rng.integers(0, 10, 5))}, num_classes=10, source="test")
    from mpinewton.checkpoint import write_checkpoint

    foreign = write_checkpoint(tmp / "foreign", iteration=1,
                               weights={"dense/kernel": np.ones((3, 2))}, state={},
                               config_toml="", config_sha256="0" * 64, world_size=1)
    cli = {  # the real entry points, failing before TensorFlow starts
        "missing": start(2, "predict", str(tmp / "no-such-run"), "--data", str(dataset),
                         "--out", str(tmp / "missing.h5")),
    }
    trained = run_job(1, *small_job(dataset), "--run-dir", str(run_dir), timeout=TIMEOUT)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    cli["split"] = start(2, "evaluate", str(run_dir), "--split", "test",
                         "--json", str(tmp / "split.json"))
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    job = str(ROOT / "jobs" / "mnist_cnn.toml")
    predict = ["--data", str(dataset), "--split", "train", "--out"]
    many = {
        1: {"eval1": ("evaluate", [str(run_dir), "--json", str(tmp / "eval1.json")]),
            "pred1": ("predict", [str(ckpt), *predict, str(tmp / "pred1.h5")])},
        2: {"eval2": ("evaluate", [str(run_dir), "--json", str(tmp / "eval2.json")]),
            "foreign": ("evaluate", [str(foreign), "--job", job, "--data", str(dataset),
                                     "--split", "train", "--json", str(tmp / "foreign.json")]),
            "shape": ("predict", [str(run_dir), "--data", str(small),
                                  "--out", str(tmp / "shape.h5")])},
        3: {"pred3": ("predict", [str(run_dir), *predict, str(tmp / "pred3.h5")])},
    }
    # one launch per rank count, every command in-process (one TensorFlow start a rank)
    launches = {ranks: start_many(None, ranks, [(f"mpinewton.{module}", argv)
                                                for module, argv in commands.values()],
                                  tmp / f"many{ranks}", cli_last=False)
                for ranks, commands in many.items()}
    done = {}
    try:
        for name, proc in finish(cli).items():
            done[name] = SimpleNamespace(returncode=proc.returncode, stdout=proc.stdout,
                                         stderr=proc.stderr, codes=None)
        for ranks, launch in launches.items():
            proc, recs = launch.result(timeout=TIMEOUT)
            assert proc.returncode == 0 and len(recs) == len(many[ranks]), \
                (ranks, proc.stdout, proc.stderr)
            for name, rec in zip(many[ranks], recs, strict=True):
                assert sorted(rec) == list(range(ranks)), (name, rec)
                done[name] = SimpleNamespace(returncode=rec[0]["rc"], stdout=rec[0]["stdout"],
                                             stderr=rec[0]["stderr"],
                                             codes=[rec[r]["rc"] for r in range(ranks)])
    finally:
        for launch in launches.values():
            launch.kill()
    return tmp, run_dir, done


def _ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_evaluate_reproduces_the_summary_on_1_and_2_ranks(runs):
    tmp, run_dir, done = runs
    summary = json.loads((run_dir / "summary.json").read_text())
    results = {}
    for ranks in (1, 2):
        _ok(done[f"eval{ranks}"])
        out = json.loads((tmp / f"eval{ranks}.json").read_text())
        assert out["world_size"] == ranks and out["weights_from"] == str(run_dir / "weights.h5")
        assert list(out["splits"]) == ["validation", "train"]
        train, validation = out["splits"]["train"], out["splits"]["validation"]
        assert (train["samples"], validation["samples"]) == (101, 17)
        for got, want in ((train["loss"], summary["final_loss"]),
                          (train["accuracy"], summary["train_accuracy"]),
                          (validation["loss"], summary["validation_loss"]),
                          (validation["accuracy"], summary["validation_accuracy"])):
            assert got == pytest.approx(want, rel=1e-10, abs=1e-15)
        results[ranks] = out["splits"]
    for split in ("train", "validation"):
        for key in ("loss", "accuracy"):
            assert results[1][split][key] == pytest.approx(results[2][split][key], rel=1e-12)
    table = done["eval2"].stdout
    assert "split" in table and "samples" in table and "accuracy" in table
    assert f"{summary['train_accuracy']:.4f}" in table


def test_predict_gives_the_same_outputs_on_1_and_3_ranks(runs, dataset):
    tmp, run_dir, done = runs
    _ok(done["pred1"]), _ok(done["pred3"])
    summary = json.loads((run_dir / "summary.json").read_text())
    with h5py.File(dataset, "r") as f:
        labels = f["train/y"][...]
    with h5py.File(tmp / "pred1.h5", "r") as one, h5py.File(tmp / "pred3.h5", "r") as three:
        assert one["outputs"].shape == (101, 10)
        np.testing.assert_allclose(one["outputs"][...], three["outputs"][...], rtol=1e-12,
                                   atol=1e-15)
        np.testing.assert_allclose(one["outputs"][...].sum(axis=1), 1.0, rtol=1e-12)
        for f in (one, three):
            np.testing.assert_array_equal(f["y"][...], labels)
            np.testing.assert_array_equal(f["predicted"][...],
                                          np.argmax(f["outputs"][...], axis=1))
            assert np.mean(f["predicted"][...] == labels) == pytest.approx(
                summary["train_accuracy"], rel=1e-12)
            assert f.attrs["split"] == "train" and f.attrs["job"] == summary["job"]
            assert f.attrs["accuracy"] == pytest.approx(summary["train_accuracy"], rel=1e-10)
        assert "ckpt-" in one.attrs["weights_from"]
        assert three.attrs["weights_from"] == str(run_dir / "weights.h5")
        assert (one.attrs["world_size"], three.attrs["world_size"]) == (1, 3)
        assert "[model]" in one.attrs["job_toml"]


@pytest.mark.parametrize(("name", "messages"), [
    ("missing", ["finding the weights failed on rank 0, 1", "no-such-run does not exist",
                 "give a run directory, a checkpoint file or a weights file"]),
    ("foreign", ["loading the weights failed on rank 0", "does not fit the job's model",
                 "it holds 6 weights", "the model 3,192", "variable 0"]),
    ("split", ["checking the splits failed on rank 0, 1", "unknown split 'test'",
               "the file has train, validation"]),
    ("shape", ["failed on rank 0, 1", "samples have shape (8, 8, 1)",
               "model expects (28, 28, 1)"]),
])
def test_bad_input_ends_every_rank_and_writes_nothing(runs, name, messages):
    tmp, _, done = runs
    proc = done[name]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.codes is None or set(proc.codes) == {2}, proc.codes
    for message in messages:
        assert message in proc.stderr, proc.stderr
    assert not (tmp / f"{name}.json").exists() and not (tmp / f"{name}.h5").exists()
    assert not list(tmp.glob(".*.tmp"))
