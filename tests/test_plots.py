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
