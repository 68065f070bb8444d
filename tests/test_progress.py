"""mpinewton.progress: rate-limited progress lines, one per update off a terminal, \\r on one."""

from __future__ import annotations

import io
import re

import pytest

from mpinewton import progress as progress_module
from mpinewton.progress import Progress

LINE = re.compile(r"^(\w+): ([\d,]+)/([\d,]+) (\w+) \((\d+)%\) (\d+\.\d) s, (eta (\d+\.\d|\?) s|"
                  r"[\d,]+ \w+/s)$")


class Clock:
    """A fake ``time.perf_counter``: the tests set the time."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", c)
    return c


def test_line_format_and_eta(clock: Clock) -> None:
    out = io.StringIO()
    p = Progress(50_000, "import", stream=out, min_interval=1.0)
    clock.now += 3.1
    p.update(12_345)  # 3.1 s >= 1 s since the start: printed
    line = out.getvalue()
    eta = 3.1 * (50_000 - 12_345) / 12_345  # independent: time per row * rows left
    assert line == f"import: 12,345/50,000 rows (25%) 3.1 s, eta {eta:.1f} s\n"
    m = LINE.match(line.rstrip("\n"))
    assert m is not None and m.group(1) == "import"


def test_rate_limited_one_line_per_printed_update_off_a_terminal(clock: Clock) -> None:
    out = io.StringIO()
    p = Progress(100, "resize", stream=out, min_interval=1.0, unit="images")
    for _ in range(3):  # 0.25 s apart: only every 4th update is 1 s after the last line
        clock.now += 0.25
        p.update(1)
    assert out.getvalue() == ""
    clock.now += 0.25
    p.update(1)
    lines = out.getvalue().splitlines()
    assert lines == ["resize: 4/100 images (4%) 1.0 s, eta 24.0 s"]
    clock.now += 0.5
    p.update(46)  # 0.5 s after the last line: not printed
    assert len(out.getvalue().splitlines()) == 1
    clock.now += 0.5
    p.update(50)  # the end is always printed, with the rate
    lines = out.getvalue().splitlines()
    assert lines[-1] == "resize: 100/100 images (100%) 2.0 s, 50 images/s"
    assert all(LINE.match(s) for s in lines) and "\r" not in out.getvalue()
    p.close()  # nothing new to show: no further line
    assert len(out.getvalue().splitlines()) == 2


def test_close_prints_the_final_count_once(clock: Clock) -> None:
    out = io.StringIO()
    with Progress(10, "x", stream=out, min_interval=60) as p:
        p.update(4)
        clock.now += 2
    assert out.getvalue() == "x: 4/10 rows (40%) 2.0 s, eta 3.0 s\n"


def test_terminal_redraws_in_place(clock: Clock) -> None:
    out = Tty()
    p = Progress(3, "import", stream=out, min_interval=0)
    clock.now += 1
    p.update(1)
    clock.now += 1
    p.update(2)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert text.startswith("\rimport: 1/3 rows (33%) 1.0 s, eta 2.0 s")
    assert "\rimport: 3/3 rows (100%) 2.0 s, 2 rows/s" in text


def test_disabled_and_empty(clock: Clock) -> None:
    out = io.StringIO()
    p = Progress(5, "quiet", stream=out, enabled=False)
    p.update(5)
    p.close()
    assert out.getvalue() == "" and p.done == 5
    with Progress(0, "none", stream=out) as p:
        pass
    assert out.getvalue() == "none: 0/0 rows (100%) 0.0 s\n"
    with pytest.raises(ValueError, match="total must be >= 0"):
        Progress(-1, "bad")


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(2, "err") as p:
        p.update(2)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("err: 2/2 rows (100%)")
