"""The race's per-step decisions are the same on every rank (design: lockstep collectives).

Each rank reads its own clock, so "past the time limit" and "an evaluation
is due" can differ between ranks by a few microseconds. An evaluation is a
collective: taken by one rank and not the other, it pairs with the wrong
Allreduce, mixes numbers from different sums and stops the race early. The
hooks therefore decide both with one Allreduce; here a fake communicator
plays the other rank.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from mpinewton.compare import _Race


class _OtherRank:
    """A one-rank communicator whose sums add the other rank's flags."""

    size = 1

    def __init__(self) -> None:
        self.other = np.zeros(2)

    def bcast_array(self, w):
        return w

    def allreduce_sum(self, x):
        return np.asarray(x) + self.other


def _hooks(comm, evaluated):
    stats = SimpleNamespace(values=0, grads=0, grad_squares=0, hvps=0, gnvps=0, kfac=0)
    problem = SimpleNamespace(stats=stats)
    session = SimpleNamespace(comm=comm, shard=SimpleNamespace(total=10))
    evaluator = SimpleNamespace(value=lambda w: evaluated.append(w.copy()) or 0.5)
    hooks = _Race(session, problem, problem, None, 1.0, 1e9, sampler=object(),
                  evaluator=evaluator, eval_seconds=1e9)
    hooks.counts0 = (0, 0)
    hooks.last_eval = hooks.elapsed()  # not due on this rank's clock
    return hooks


def test_an_evaluation_due_on_another_rank_is_taken_here_too():
    comm, evaluated = _OtherRank(), []
    hooks = _hooks(comm, evaluated)
    info = SimpleNamespace(loss=1.0, record=lambda: {})
    comm.other = np.array([0.0, 1.0])  # the other rank: not over the limit, evaluation due
    _, stop = hooks.after_step(1, None, np.ones(3), None, info)
    assert not stop and len(evaluated) == 1 and hooks.trace[-1]["iter"] == 1
    comm.other = np.zeros(2)  # nobody due: no evaluation
    _, stop = hooks.after_step(2, None, np.ones(3), None, info)
    assert not stop and len(evaluated) == 1


def test_a_rank_past_the_time_limit_stops_every_rank():
    comm, evaluated = _OtherRank(), []
    hooks = _hooks(comm, evaluated)
    info = SimpleNamespace(loss=1.0, record=lambda: {})
    comm.other = np.array([1.0, 0.0])
    _, stop = hooks.after_step(1, None, np.ones(3), None, info)
    assert stop and not evaluated


def test_only_the_products_the_variants_take_are_compiled():
    from mpinewton.compare import parse_variant, products_used
    from mpinewton.config import load_job

    job = load_job(None, [])

    def used(*specs):
        return products_used([parse_variant(s, job).optimizer for s in specs])

    assert used("a=gd", "b=adam,learning_rate=0.01", "c=lbfgs") == set()
    assert used("a=kfac,curvature_fraction=0.05") == {"kfac:2048"}
    assert used("a=kfac", "b=kfac,max_factor_dim=512") == {"kfac:2048", "kfac:512"}
    assert used('a=kfac,fisher="sampled"', "b=kfac") == {"kfac:2048:sampled", "kfac:2048"}
    assert used('a=kfac,damping_rule="levenberg_marquardt"') == {"kfac:2048", "gnvp"}
    assert used("a=newton,curvature=gauss_newton,preconditioner=none") == {"gnvp"}
    assert used("a=newton,curvature=hessian,preconditioner=fisher") == {"hvp", "grad_squares"}
    assert used("a=trust_region,curvature=gauss_newton", "b=newton,curvature=hessian,"
                "preconditioner=none") == {"gnvp", "hvp"}


def test_reports_round_trip_plain_and_gzip(tmp_path):
    from pathlib import Path

    from mpinewton.compare import png_path, read_report, write_report

    data = {"results": [{"label": "a", "trace": [{"loss": 0.5}]}]}
    for name in ("race.json", "race.json.gz"):
        write_report(tmp_path / name, data)
        assert read_report(tmp_path / name) == data
        assert png_path(tmp_path / name) == tmp_path / "race.png"
    assert (tmp_path / "race.json.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert png_path(Path("docs/x.json")) == Path("docs/x.png")


def _trace(points):
    return [{"iter": i, "seconds": t, "passes": float(i), "loss": loss}
            for i, (t, loss) in enumerate(points)]


def test_who_is_first_until_when_and_the_loss_at_given_seconds():
    from mpinewton.compare import first_until, loss_at, markdown, summarise

    a = _trace([(0.0, 1.0), (1.0, 0.5), (2.0, 0.3), (3.0, 0.2)])
    b = _trace([(0.5, 1.0), (1.0, 0.8), (2.0, 0.4), (3.0, 0.1)])
    # a is first to 0.5 (at 1 s) and 0.3 (2 s): b gets below them only at 3 s; level at 0.2.
    # The common start (b's first point, at 0.5 s on its clock) is nobody's lead.
    assert first_until(a, b) == 2.0
    assert first_until(b, a) == 3.0  # a never reaches 0.1
    assert first_until(a, a) is None
    # against the definition, point by point, on random walks with ties and plateaus
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y = (_trace(zip(np.cumsum(rng.integers(0, 3, 30)) + t0,
                           np.round(rng.random(30), 1), strict=True)) for t0 in (0.0, 0.5))
        slow = None
        for p in x:
            hit = next((q for q in y if q["loss"] <= p["loss"]), None)
            if hit is None or (hit is not y[0] and hit["seconds"] > p["seconds"]):
                slow = p["seconds"]
        assert first_until(x, y) == slow
    assert loss_at(b, 0.4) is None and loss_at(b, 2.5) == 0.4 and loss_at(b, 3.0) == 0.1
    results = [{"label": "a", "trace": a, "steps": []}, {"label": "b", "trace": b, "steps": []}]
    summary = summarise(results, None, 0)
    assert summary["first_until"] == {"a": {"b": 2.0}, "b": {"a": 3.0}}
    table = markdown({"summary": summary, "results": results, "time_limit": 10.0})
    assert "| method | 5 s | 10 s | final |" in table  # only the seconds within the limit
    assert "| a | 0.2000 | 0.2000 | 0.2000 |" in table
    assert "| a |  | 2.0 |" in table and "| b | 3.0 |  |" in table
    # passes: a's i-th point at i passes (_trace); both made 3, the common last column
    assert "| method | 1 | 2 | 3 |" in table
    assert "| a | 0.5000 | 0.3000 | 0.2000 |" in table
    assert "| b | 0.8000 | 0.4000 | 0.1000 |" in table
    assert loss_at(b, 1.5, "passes") == 0.8


def test_one_table_over_several_races(tmp_path, capsys):
    from mpinewton.compare import main, markdown_races, write_report

    def race(adam, kfac):
        return {"time_limit": 10.0, "summary": {}, "results": [
            {"label": "kfac", "trace": _trace(kfac), "steps": []},
            {"label": "adam", "trace": _trace(adam), "steps": []}]}

    # seed 0: Adam first to 0.6 (at 1 s, K-FAC at 2 s), K-FAC ends lower and passes
    # Adam's final 0.4 at 3 s; seed 1: K-FAC never reaches Adam's 0.3.
    one = race([(0.0, 1.0), (1.0, 0.6), (4.0, 0.4)], [(0.0, 1.0), (2.0, 0.5), (3.0, 0.2)])
    two = race([(0.0, 1.0), (1.0, 0.3)], [(0.0, 1.0), (2.0, 0.5)])
    table = markdown_races([("s0", one), ("s1", two)], "adam")
    assert ("| race | final: kfac | final: adam | kfac: to adam's final "
            "| adam first until (kfac) |") in table
    assert "| s0 | 0.2000 | 0.4000 | 3.0 s | 1.0 s |" in table
    assert "| s1 | 0.5000 | 0.3000 | never | 1.0 s |" in table
    assert "| mean | 0.3500 | 0.3500 | | |" in table
    with pytest.raises(ValueError, match="not a variant"):
        markdown_races([("s0", one)], "sgd")
    other = race([(0.0, 1.0)], [(0.0, 1.0)])
    other["results"][0]["label"] = "newton"
    with pytest.raises(ValueError, match="s2: variants"):
        markdown_races([("s0", one), ("s2", other)], None)
    for name, data in (("s0.json.gz", one), ("s1.json", two), ("s2.json", other)):
        write_report(tmp_path / name, data)
    assert main(["--report", str(tmp_path / "s0.json.gz"), str(tmp_path / "s1.json"),
                 "--versus", "adam"]) == 0
    assert "| s1.json | 0.5000 | 0.3000 | never | 1.0 s |" in capsys.readouterr().out
    assert main(["--report", str(tmp_path / "s0.json.gz"), str(tmp_path / "s2.json")]) == 2
    assert "s2.json: variants" in capsys.readouterr().err


def test_per_step_losses_over_the_steps_every_method_took():
    from mpinewton.compare import markdown, per_step, summarise

    rng = np.random.default_rng(1)
    a_loss, b_loss = rng.random(10), rng.random(7)
    results = [
        {"label": "a", "trace": _trace([(0.0, 1.0), (1.0, 0.5)]),
         "steps": [{"loss": x, "seconds": 5.0 if i == 0 else 0.1 * (i + 1)}  # a dear first step
                   for i, x in enumerate(a_loss)]},
        # a race from before the steps were clocked: no seconds
        {"label": "b", "trace": _trace([(0.0, 1.0), (1.0, 0.4)]),
         "steps": [{"loss": x} for x in b_loss]}]
    out = per_step(results)
    assert out["steps"] == 7  # b's 7 steps: a's first 7 against them
    a, b = out["methods"]["a"], out["methods"]["b"]
    assert a["steps"] == 10 and b["steps"] == 7
    assert a["median_seconds"] == pytest.approx(0.65) and b["median_seconds"] is None
    assert a["mean_seconds"] == pytest.approx(1.04) and b["mean_seconds"] is None
    assert a["mean_loss"] == pytest.approx(a_loss[:7].sum() / 7)
    assert b["mean_loss"] == pytest.approx(b_loss.sum() / 7)
    # quarters of 7 steps: 2, 2, 2, 1
    assert a["quarters"] == pytest.approx([a_loss[0:2].mean(), a_loss[2:4].mean(),
                                           a_loss[4:6].mean(), a_loss[6]])
    table = markdown({"summary": summarise(results, None, 0), "results": results,
                      "time_limit": 10.0})
    assert "mean loss of each method's first 7 steps" in table
    assert f"| a | 10 | 1.04 (0.65) s | {a_loss[:7].mean():.4f} | " in table
    assert f"| b | 7 | - | {b_loss.mean():.4f} | " in table
    assert per_step([{"label": "c", "trace": [], "steps": []}] + results) == {
        "steps": 0, "methods": {}}


def test_each_evaluation_times_itself_and_the_gauge_compares_the_turns():
    import time

    from mpinewton.compare import markdown, speed_gauge, summarise

    comm, evaluated = _OtherRank(), []
    hooks = _hooks(comm, evaluated)
    hooks.evaluator = SimpleNamespace(value=lambda w: time.sleep(0.02) or 0.5)
    hooks.evaluate(3, np.ones(3))
    point = hooks.trace[-1]
    assert point["loss"] == 0.5 and 0.02 <= point["probe_seconds"] < 1.0
    assert hooks.elapsed() < point["probe_seconds"]  # and off the race's clock

    def turn(label, probes):
        return {"label": label, "steps": [], "trace": [
            {"iter": i, "seconds": float(i), "passes": 0.0, "loss": 1.0 / (i + 1),
             "probe_seconds": p} for i, p in enumerate(probes)]}

    # the first probe (caches still cold) is left out; medians 1.0, 1.2 and 1.5
    results = [turn("a", [9.0, 1.0, 0.9, 1.1]), turn("b", [9.0, 1.2, 1.2]),
               turn("c", [0.1, 1.5, 1.4, 1.6])]
    gauge = speed_gauge(results)
    assert {k: v["median"] for k, v in gauge.items()} == pytest.approx(
        {"a": 1.0, "b": 1.2, "c": 1.5})
    assert {k: v["relative"] for k, v in gauge.items()} == pytest.approx(
        {"a": 1.0 / 1.2, "b": 1.0, "c": 1.5 / 1.2})
    summary = summarise(results, None, 0)
    assert summary["speed_gauge"] == gauge
    assert "| c | 1.500 s | 1.250 |" in markdown(
        {"summary": summary, "results": results, "time_limit": 10.0})
    # a race without probes (full batch, or older): no gauge
    del results[1]["trace"][2]["probe_seconds"], results[1]["trace"][1]["probe_seconds"]
    assert speed_gauge(results) is None and "speed_gauge" not in summarise(results, None, 0)


def test_steps_to_loss_script(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from mpinewton.compare import write_report

    path = Path(__file__).resolve().parents[1] / "scripts" / "steps-to-loss.py"
    spec = importlib.util.spec_from_file_location("steps_to_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses = np.array([2.0, 2.0, 1.0, 1.0, 0.5, 0.1])
    # means of 2: 2, 1.5, 1, 0.75, 0.3 after steps 2..6
    assert module.steps_to(losses, 1.5, 2) == 3
    assert module.steps_to(losses, 0.3, 2) == 6
    assert module.steps_to(losses, 0.1, 2) is None
    assert module.steps_to(losses, 2.0, 1) == 1
    assert module.steps_to(losses[:1], 2.0, 2) is None
    write_report(tmp_path / "r.json", {"results": [
        {"label": "a", "steps": [{"loss": x} for x in losses]},
        {"label": "b", "steps": [{"loss": 2.0}] * 6}]})
    assert module.main([str(tmp_path / "r.json"), "--window", "2", "--levels", "0.3"]) == 0
    assert "| 0.3 | 6 | - |" in capsys.readouterr().out
    assert module.main([str(tmp_path / "missing.json")]) == 2
