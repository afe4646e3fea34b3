"""Progress output people can read in a log: plain lines, no carriage returns, a bounded count."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from rich.console import Console

from labelsieve.core import progress
from labelsieve.core.progress import format_duration, is_interactive, progress_bar


def test_plain_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_MIN_SECONDS", 0.0)  # every 10 % step prints, however fast the loop
    with progress_bar(1000, "extracting features") as advance:
        for _ in range(1000):
            advance(1, loss=0.5)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert len(lines) == 11  # start, 9 steps (10 % … 90 %), done
    assert lines[0] == "extracting features: 0/1000 img"
    assert lines[5].startswith("extracting features: 500/1000 img (50%), ") and "img/s, eta " in lines[5]
    assert lines[5].endswith("loss=0.5")
    assert lines[-1].startswith("extracting features: done, 1000 img in ")


def test_plain_lines_are_rate_limited_and_say_where_a_stage_stopped(capsys):
    try:
        with progress_bar(100_000, "decoding", unit="batch") as advance:
            for _ in range(50_000):  # a fast loop: well under PLAIN_MIN_SECONDS, so no step lines
                advance()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["decoding: 0/100000 batch", "decoding: stopped at 50000/100000 batch"]


def test_forced_colour_on_a_file_is_not_interactive():
    """FORCE_COLOR makes rich call any stream a terminal; a log file must still get plain lines."""
    assert not is_interactive(Console(file=io.StringIO(), force_terminal=True))
    assert not is_interactive(Console(file=io.StringIO()))


def test_a_redirected_run_writes_no_carriage_returns(tmp_path):
    """The whole path as a user hits it: a process whose stderr goes to a file, with FORCE_COLOR set."""
    script = ("from labelsieve.core.progress import progress_bar\n"
              "with progress_bar(300, 'stage') as adv:\n"
              "    [adv() for _ in range(300)]\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", script], stderr=f, stdout=f, check=True,
                       env={**_env(), "FORCE_COLOR": "1", "TERM": "xterm-256color"})
    text = log.read_text()
    assert "\r" not in text and "\x1b[" not in text
    assert text.splitlines()[0] == "stage: 0/300 img" and text.splitlines()[-1].startswith("stage: done, 300 img")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE")}


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 42, 187, 7500)] == ["0s", "42s", "3m07s", "2h05m"]
