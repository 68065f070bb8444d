"""``python -m mpinewton.compare`` under mpirun on a tiny data set, and its bookkeeping.

The race's figures are not checked (speed never is by tests); what is checked
is that the command runs every variant from the same weights, writes the
documented JSON and plot, finds who reaches the reference's loss first, and
refuses bad variants on every rank.
"""

import json

import pytest
from mpijobs import mpi_env, requires_mpirun

from mpinewton.compare import cut_cg_share, first_time_below, markdown, summarise

pytestmark = requires_mpirun


def _compare_args(dataset, out, *args):
    """Arguments of ``python -m mpinewton.compare`` on the tiny data set."""
    return ["--set", f"data.path={json.dumps(str(dataset))}",
            "--set", "optimizer.pretrain_iters=2", "--set", "objective.jit=false",
            "--set", "objective.micro_batch=16", "--out", str(out), *args]


#: The full-batch race: every kind of method against gradient descent as the reference.
FULL_RACE = ["--max-iters", "3", "--reference", "gd", "--reference-iters", "2",
             "--variant", "gd=gd,learning_rate=0.5",
             "--variant", "hf=newton,curvature=gauss_newton,"
                          "damping_rule=levenberg_marquardt,curvature_fraction=0.5",
             "--variant", "lbfgs=lbfgs",
             # damping >= 10 x its initial value: the sample doubles after each step
             "--variant", "grow=newton,curvature=gauss_newton,damping_rule="
                          "levenberg_marquardt,curvature_fraction=0.2,damping=1e-2,"
                          "damping_min=0.1,curvature_growth=damping,"
                          "curvature_growth_threshold=1.001,curvature_fraction_max=1.0"]


def test_compare_races_variants_from_the_same_weights(launched):
    out, record = launched["full"]
    assert all(r["rc"] == 0 for r in record.values()), record[0]
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    results = {r["label"]: r for r in report["results"]}
    assert list(results) == ["gd", "hf", "lbfgs", "grow"]
    # 101 samples: ceil(0.2 x 101) = 21, then 41 (0.4), 81 (0.8)
    assert [s["curvature_samples"] for s in results["grow"]["steps"]] == [21, 41, 81]
    starts = {r["trace"][0]["loss"] for r in results.values()}
    assert len(starts) == 1 and report["start_loss"] in starts  # one starting point
    for r in results.values():
        assert [p["iter"] for p in r["trace"]] == [0, 1, 2, 3]
        assert r["trace"][0]["seconds"] == pytest.approx(0, abs=1.0)
        assert all(a["seconds"] <= b["seconds"] and a["passes"] <= b["passes"]
                   for a, b in zip(r["trace"], r["trace"][1:], strict=False))
        assert len(r["steps"]) == 3
        # each step's clocked seconds: the clock between the trace points holds them
        seconds = [s["seconds"] for s in r["steps"]]
        assert all(s > 0 for s in seconds), seconds
        for k in (1, 2):
            assert sum(seconds[:k]) <= r["trace"][k]["seconds"] + 1e-9
    assert results["hf"]["optimizer"]["curvature_fraction"] == 0.5
    assert all(s["curvature"] == "gauss_newton" for s in results["hf"]["steps"])
    summary = report["summary"]
    assert summary["target"] == {"loss": results["gd"]["trace"][2]["loss"], "reference": "gd",
                                 "reference_iters": 2}
    assert summary["to_target"]["gd"]["iter"] == 2
    assert "hf" in summary["cut_cg_share"] and "gd" not in summary["cut_cg_share"]
    assert "target loss" in record[0]["stdout"]


def test_summary_bookkeeping():
    trace_a = [{"iter": i, "seconds": float(i), "passes": 2.0 * i, "loss": 1.0 / (i + 1)}
               for i in range(5)]
    trace_b = [{"iter": i, "seconds": 3.0 * i, "passes": float(i), "loss": 1.0 - 0.1 * i}
               for i in range(5)]
    results = [{"label": "a", "trace": trace_a, "steps": []},
               {"label": "b", "trace": trace_b,
                "steps": [{"cg_iters": 10, "step_size": 1.0}, {"cg_iters": 30, "step_size": 0.125},
                          {"cg_iters": 0, "step_size": 0.0}]}]
    assert first_time_below(trace_a, 0.3)["iter"] == 3
    assert first_time_below(trace_b, 0.1) is None
    summary = summarise(results, "b", 2)
    assert summary["target"]["loss"] == pytest.approx(0.8)
    assert summary["to_target"]["a"]["seconds"] == 1.0  # 1/2 <= 0.8 at iteration 1
    assert summary["to_target"]["b"]["seconds"] == 6.0
    assert summary["speedup_vs_reference"]["a"] == 6.0
    assert cut_cg_share(results[1]["steps"]) == {"cg_iters": 40, "cut": 30, "share": 0.75}
    assert summary["best_loss"] == {"a": 0.2, "b": pytest.approx(0.6)}
    table = markdown({"summary": summary, "results": results})
    assert "| a | 4 | 0.2000 | 1.0 | 2.0 | 6.0 | - |" in table
    assert "| b | 4 | 0.6000 | 6.0 | 2.0 | 1.0 | 75.0 % (30 of 40) |" in table


#: The mini-batch race's job: batches of 20 of the 101 samples, pre-training at lr 0.5.
BATCH_JOB = ["--set", "optimizer.batch_size=20", "--set", "optimizer.pretrain_lr=0.5"]
#: Progressive batches by the norm test, from 20 samples to at most 60.
NORM_TEST = "batch_growth=norm_test,batch_theta=0.2,batch_max=60"


#: The mini-batch race's variants.
VARIANTS = ["--variant", "gd=gd,learning_rate=0.3",
            "--variant", "gd-again=gd,learning_rate=0.3",
            "--variant", "gd-b40=gd,learning_rate=0.3,batch_size=40",
            "--variant", "gd-avg=gd,learning_rate=0.3,average=0.5",
            "--variant", f"gd-grow=gd,learning_rate=0.3,{NORM_TEST}",
            "--variant", "hf=newton,curvature=gauss_newton,"
                         "damping_rule=levenberg_marquardt,curvature_fraction=0.5",
            "--variant", "hf-double=newton,curvature=gauss_newton,damping_rule="
                         "levenberg_marquardt,curvature_fraction=0.5,batch_growth="
                         "geometric,batch_every=2,batch_max=60",
            "--variant", "lbfgs=lbfgs",
            # the sampled Fisher's draws come with the curvature rows, also at 1
            "--variant", 'kfac=kfac,fisher="sampled",learning_rate=0.05']
#: Races refused before they start: their arguments, and words of the error.
REFUSED = [
    (["--variant", "a=newton,dampin=1"], "did you mean optimizer.damping"),
    (["--variant", "a=gd", "--variant", "a=adam"], "labels must differ"),
    (["--variant", "a=gd,batch_growth=norm_test"], "full-batch runs"),
    (["--variant", "a=gd,batch_size=10"], "set optimizer.batch_size in the job"),
    (["--variant", "a=gd,average=0.9"], "average needs a mini-batch race"),
    (["--average", "0.9"], "--average needs a mini-batch race"),
    (["--set", "optimizer.batch_size=20", "--variant", "a=gd,batch_size=500"],
     "batch_size 500 exceeds the 101 training samples"),
]


@pytest.fixture(scope="module")
def launched(dataset, tmp_path_factory):
    """Every command of this module in ONE 2-rank launch (``mpijobs.start_many``; a
    launch costs each rank TensorFlow's start), one after another in each rank's
    process: the full-batch race; ``python -m mpinewton.train`` with the settings of the
    mini-batch race's gradient-descent variants (with fixed batches and with the norm
    test's); the mini-batch race, and the same race with ``--interleave``; then the
    refused races, the last through the real entry point.

    Returns, by name, each command's report path and its record (``rank: {"rc",
    "stdout", "stderr"}``; the last command's is the launch's exit status and output);
    ``"refused"`` lists those of REFUSED, and ``"dir"`` is the base folder.
    """
    from mpijobs import start_many

    base = tmp_path_factory.mktemp("compare")
    train = ["--set", f"data.path={json.dumps(str(dataset))}",
             "--set", "optimizer.pretrain_iters=2", "--set", "objective.jit=false",
             "--set", "objective.micro_batch=16", *BATCH_JOB, "--set", "optimizer.method='gd'",
             "--set", "optimizer.learning_rate=0.3", "--set", "optimizer.iters=4",
             "--set", "data.eval_splits=[]"]
    growing = ["--set", "optimizer.batch_growth='norm_test'", "--set",
               "optimizer.batch_theta=0.2", "--set", "optimizer.batch_max=60"]
    race = [*BATCH_JOB, "--max-iters", "4", "--eval-samples", "30", "--eval-seconds", "0",
            "--average", "0.5,0.9", *VARIANTS]
    named = [("full", "mpinewton.compare", base / "full.json", FULL_RACE),
             ("fixed", "mpinewton.train", None, [*train, "--run-dir", str(base / "fixed")]),
             ("growing", "mpinewton.train", None,
              [*train, *growing, "--run-dir", str(base / "growing")]),
             ("race", "mpinewton.compare", base / "race.json", race),
             # the same race in turns, one step each
             ("turns", "mpinewton.compare", base / "turns.json", [*race, "--interleave"])]
    named += [(f"refused{i}", "mpinewton.compare", base / f"refused{i}.json", args)
              for i, (args, _) in enumerate(REFUSED)]
    commands = [(module, _compare_args(dataset, out, *args) if out else args)
                for _, module, out, args in named]
    # the races draw their figures (rank 0): matplotlib importable
    launch = start_many(None, 2, commands, base / "launch", env=mpi_env(matplotlib=True))
    try:
        records = launch.outcomes(timeout=500)
    finally:
        launch.kill()
    out = {name: (path, record)
           for (name, _, path, _), record in zip(named, records, strict=True)}
    out["refused"] = [out.pop(f"refused{i}") for i in range(len(REFUSED))]
    out["dir"] = base
    return out


@pytest.fixture(scope="module")
def batch_race(launched):
    """The mini-batch race's report and the two training runs' metrics; the same race
    run with ``--interleave`` is the report's ``"interleaved_report"``."""
    from mpijobs import read_metrics

    for name in ("fixed", "growing", "race", "turns"):
        record = launched[name][1]
        assert all(r["rc"] == 0 for r in record.values()), (name, record[0])
    assert "interleaved" in launched["turns"][1][0]["stdout"]
    trained = {name: [m for m in read_metrics(launched["dir"] / name)
                      if m.get("phase") == "gd"] for name in ("fixed", "growing")}
    report = json.loads(launched["race"][0].read_text())
    report["interleaved_report"] = json.loads(launched["turns"][0].read_text())
    return report, trained


#: What may differ between two runs of the same steps: the clocks.
CLOCKS = ("seconds", "probe_seconds")


def _without_clocks(records):
    return [{k: v for k, v in r.items() if k not in CLOCKS} for r in records]


def test_an_interleaved_race_takes_the_same_steps(batch_race):
    """``--interleave``: every variant in turns, one step each, takes exactly the steps it
    takes alone (the same batches, losses, counts and trace), on a clock of its own that
    stops while the others step."""
    report, _ = batch_race
    turns = report["interleaved_report"]
    assert turns["interleaved"] is True and report["interleaved"] is False
    assert [r["label"] for r in turns["results"]] == [r["label"] for r in report["results"]]
    for alone, in_turns in zip(report["results"], turns["results"], strict=True):
        assert _without_clocks(in_turns["steps"]) == _without_clocks(alone["steps"]), \
            alone["label"]
        assert _without_clocks(in_turns["trace"]) == _without_clocks(alone["trace"]), \
            alone["label"]
        assert in_turns["trace"][0]["seconds"] < 0.05
    # Each variant's clock holds its own steps and not the others': with all the others'
    # steps between its first and its last, a clock that ran on would exceed its own
    # steps by most of theirs.
    total = sum(s["seconds"] for r in turns["results"] for s in r["steps"])
    for r in turns["results"]:
        own = sum(s["seconds"] for s in r["steps"])
        clock = r["trace"][-1]["seconds"]
        assert own <= clock + 1e-9
        assert clock - own < 0.25 * (total - own), (r["label"], clock, own, total)


def test_mini_batch_race_draws_the_trainers_batches(batch_race):
    """With optimizer.batch_size, every variant draws the batches training would draw.

    Pre-training and the gradient-descent variant walk exactly the path of
    ``python -m mpinewton.train`` with the same job (the losses on each
    step's batch agree), every variant sees the same batches (two identical
    variants give identical traces), and the trace is the loss on the first
    ``--eval-samples`` samples, one point per step with ``--eval-seconds 0``.
    """
    report, trained = batch_race
    assert report["batch_size"] == 20 and report["eval_samples"] == 30
    assert report["complete"] is True and len(report["variants"]) == 9  # rewritten per variant
    results = {r["label"]: r for r in report["results"]}
    clocks = ("seconds", "probe_seconds")  # the clock and the evaluations' wall time differ
    assert results["gd"]["trace"] == [{**p, **{c: results["gd"]["trace"][i][c] for c in clocks}}
                                      for i, p in enumerate(results["gd-again"]["trace"])]
    assert all(p["probe_seconds"] > 0 for r in results.values() for p in r["trace"])
    for r in results.values():
        assert [p["iter"] for p in r["trace"]] == [0, 1, 2, 3, 4]
    # A gradient step reads one batch: 20 of the 101 samples, 20/101 of a pass.
    assert [p["passes"] for p in results["gd"]["trace"]] == pytest.approx(
        [k * 20 / 101 for k in range(5)])
    # A variant's own batch size: 40 samples a step, from the same start.
    assert results["gd-b40"]["batch_size"] == 40 and results["gd"]["batch_size"] == 20
    assert [p["passes"] for p in results["gd-b40"]["trace"]] == pytest.approx(
        [k * 40 / 101 for k in range(5)])
    assert results["gd-b40"]["trace"][1]["loss"] != results["gd"]["trace"][1]["loss"]
    # A variant's own batch compiles before its clock starts: no variant's first trace
    # point is late (it had carried that variant's warm-up before).
    assert all(r["trace"][0]["seconds"] < 0.05 for r in results.values()), \
        {k: r["trace"][0]["seconds"] for k, r in results.items()}
    assert len({r["trace"][0]["loss"] for r in results.values()}) == 1
    assert {s["curvature"] for s in results["hf"]["steps"]} == {"gauss_newton"}
    # L-BFGS keeps its last trial's loss and gradient for the next step; on a new
    # batch it must not use them: each step's loss is on its own batch, not the
    # previous step's new_loss (which a reused cache would give bit for bit).
    lbfgs = results["lbfgs"]["steps"]
    assert len(lbfgs) == 4
    assert all(now["loss"] != before["new_loss"]
               for before, now in zip(lbfgs[:-1], lbfgs[1:], strict=True))
    raced = [s["loss"] for s in results["gd"]["steps"]]
    assert raced == pytest.approx([m["loss"] for m in trained["fixed"]], rel=1e-10)


def test_a_growing_batch_race_follows_the_trainer(batch_race):
    """``batch_growth=norm_test`` in a variant: the batches grow as in training.

    The gradient-descent variant and ``python -m mpinewton.train`` with the
    same settings take the same steps on the same batches, which grow by the
    norm test from 20 samples to the cap of 60; each step counts its batch
    twice (the gradient, and the mean squared per-sample gradient the test
    needs). A Newton-CG variant with a curvature sample grows geometrically:
    it doubles after every second step, to the cap.
    """
    report, trained = batch_race
    results = {r["label"]: r for r in report["results"]}
    sizes = [s["batch_size"] for s in results["gd-grow"]["steps"]]
    assert sizes[0] == 20 and sizes[1] > 20 and max(sizes) <= 60 and sizes == sorted(sizes)
    grow = results["gd-grow"]
    assert grow["batch_size"] == 20 and grow["final_batch_size"] == sizes[-1]
    assert [s.get("next_batch_size") for s in grow["steps"][:1]] == [sizes[1]]
    passes = [0.0]
    for size in sizes:
        passes.append(passes[-1] + 2 * size / 101)
    assert [p["passes"] for p in grow["trace"]] == pytest.approx(passes)
    hf = results["hf-double"]["steps"]
    assert [s["batch_size"] for s in hf] == [20, 20, 40, 40]
    assert [s.get("next_batch_size") for s in hf] == [None, 40, None, 60]
    assert [s["curvature_samples"] for s in hf] == [10, 10, 20, 20]
    assert [m["batch_size"] for m in trained["growing"]] == sizes
    assert [m["loss"] for m in trained["growing"]] == pytest.approx(
        [s["loss"] for s in grow["steps"]], rel=1e-10)


def test_averaged_iterates_in_a_race(batch_race):
    """``average=D`` traces the loss of the iterates' average; ``--average`` traces it for all.

    The averaged variant walks the same path as the plain one (the method never
    sees the average): its ``iterate_loss`` is the plain variant's loss, and its
    loss is the plain variant's ``averaged`` loss at the same decay.
    """
    report, _ = batch_race
    results = {r["label"]: r for r in report["results"]}
    plain, averaged = results["gd"], results["gd-avg"]
    assert averaged["optimizer"]["average"] == 0.5
    assert [p["iterate_loss"] for p in averaged["trace"]] == pytest.approx(
        [p["loss"] for p in plain["trace"]], rel=1e-12)
    assert [p["loss"] for p in averaged["trace"]] == pytest.approx(
        [p["averaged"]["0.5"] for p in plain["trace"]], rel=1e-12)
    first = plain["trace"][0]  # before any step every average is the start
    assert first["averaged"] == pytest.approx({"0.5": first["loss"], "0.9": first["loss"]})
    assert plain["trace"][-1]["averaged"]["0.9"] != plain["trace"][-1]["averaged"]["0.5"]
    assert set(report["summary"]["averaged"]) == set(results)
    assert "| gd | " in markdown(report) and "average 0.9" in markdown(report)


@pytest.mark.parametrize("case", range(len(REFUSED)),
                         ids=[words for _, words in REFUSED])
def test_a_bad_race_is_an_error_on_every_rank(launched, case):
    """Unknown keys, repeated labels, batch settings that need a mini-batch race, and a
    batch larger than the data set: status 2 on every rank, the error named, no report."""
    out, record = launched["refused"][case]
    codes, stderr = [r["rc"] for r in record.values()], record[0]["stderr"]
    assert codes and all(code == 2 for code in codes), (codes, stderr)
    assert REFUSED[case][1] in stderr, stderr
    assert not out.exists()
