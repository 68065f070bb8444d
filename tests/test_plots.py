"""Loss curves read from a run directory's metrics."""

import json

import pytest

from mpinewton.plots import curve, main


def _records():
    return [
        {"iter": 1, "phase": "pretrain", "loss": 3.0, "new_loss": None, "iter_seconds": 1.0,
         "wall_time": 1.0},
        {"iter": 2, "phase": "newton", "loss": 2.0, "new_loss": 1.5, "iter_seconds": 2.0,
         "wall_time": 3.0},
        {"iter": 3, "phase": "newton", "loss": 1.5, "new_loss": 1.0, "iter_seconds": 4.0,
         "wall_time": 7.0},
    ]


def test_curve_skips_pretraining_and_ends_at_the_last_new_loss():
    iters, times, losses = curve(_records(), skip_pretrain=True)
    assert iters == [0, 1, 2]
    assert times == [0.0, 2.0, 6.0]
    assert losses == [2.0, 1.5, 1.0]


def test_curve_uses_final_loss_after_a_gradient_step():
    records = [dict(r, phase="gd", new_loss=None) for r in _records()]
    _, _, losses = curve(records, skip_pretrain=False, final_loss=0.5)
    assert losses == [3.0, 2.0, 1.5, 0.5]


def test_curve_ends_at_the_summary_loss_when_given():
    # Stochastic runs: new_loss is on the last step's own batch, final_loss on the
    # evaluation samples; every method's curve must end on the same measure.
    _, _, losses = curve(_records(), skip_pretrain=True, final_loss=1.25)
    assert losses == [2.0, 1.5, 1.25]


def _plotted(tmp_path, monkeypatch, records, labels):
    """Plot one run per label from `records`; the figure's iteration axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mpinewton.plots import plot

    runs = []
    for name in "abcdefgh"[:len(labels)]:
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        runs.append(str(run))
    captured = []
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    plot(runs, str(tmp_path / "p.png"), labels=labels)
    return captured[0].axes[0]


def test_repeated_labels_share_a_colour_and_a_legend_entry(tmp_path, monkeypatch):
    ax = _plotted(tmp_path, monkeypatch, _records(), ["Newton", "Newton", "GD"])
    colours = [line.get_color() for line in ax.get_lines()]
    assert colours[0] == colours[1] != colours[2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Newton", "GD"]


@pytest.mark.parametrize(("pretrain", "xlabel"), [
    (True, "iteration (after pre-training)"), (False, "iteration")])
def test_iteration_axis_mentions_pretraining_only_when_there_was_some(
        tmp_path, monkeypatch, pretrain, xlabel):
    records = _records() if pretrain else _records()[1:]
    assert _plotted(tmp_path, monkeypatch, records, ["Newton"]).get_xlabel() == xlabel


def test_main_writes_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _records()))
    out = tmp_path / "plot.png"
    assert main([str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="is .* a run directory"):
        main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
