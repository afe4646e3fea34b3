"""One progress display for all long work, readable wherever the output goes.

* On an interactive terminal (or in Jupyter): a rich progress bar with count, rate (items/s) and ETA.
* Anywhere else — output redirected to a file or a pipe (CI, ``nohup``, a cluster job), ``TERM=dumb``,
  or rich forced into terminal mode by ``FORCE_COLOR`` on a stream that is not a TTY: plain lines, no
  carriage returns and no cursor codes. One line when a stage starts, one each time another
  :data:`PLAIN_EVERY_FRACTION` of it is done (but at most one per :data:`PLAIN_MIN_SECONDS`) or
  :data:`PLAIN_EVERY_SECONDS` have passed since the last line, and one when it ends::

      extracting features: 0/2500 img
      extracting features: 250/2500 img (10%), 27.1 img/s, eta 1m23s
      ...
      extracting features: done, 2500 img in 1m32s (27.2 img/s)

  A stage therefore prints at most ``2 + 1/PLAIN_EVERY_FRACTION`` lines plus one per
  :data:`PLAIN_EVERY_SECONDS` of its duration.

Under torchrun only rank 0 shows progress and warnings (the other ranks do the same work in step with it,
or wait). User text (file, class and model names) never reaches rich as markup: a class named ``[/bold]`` is
printed as written (:func:`rich.markup.escape`, or :class:`rich.text.Text`, which is not parsed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from labelsieve.core.distributed import is_main

__all__ = ["PLAIN_EVERY_FRACTION", "PLAIN_EVERY_SECONDS", "PLAIN_MIN_SECONDS", "RateColumn", "console", "escape",
           "format_duration", "info", "is_interactive", "progress_bar", "warn"]

console = Console(stderr=True)

#: Plain mode prints a line each time another this fraction of a stage is done ...
PLAIN_EVERY_FRACTION = 0.1
#: ... or when this many seconds passed since its last line;
PLAIN_EVERY_SECONDS = 30.0
#: and never more often than once per this many seconds (a stage of a few seconds prints start and end only).
PLAIN_MIN_SECONDS = 5.0


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr, on one line (not wrapped, so logs can be searched);
    ``message`` is plain text (not rich markup). Rank 0 only under torchrun."""
    if not is_main():
        return
    console.print(Text.assemble(("warning: ", "bold yellow"), message), soft_wrap=True)


def info(message: str) -> None:
    """Print ``message`` (plain text, not rich markup) on stderr, on one line. Rank 0 only under torchrun."""
    if not is_main():
        return
    console.print(Text(message), soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"? {self.unit}/s", style="progress.data.speed")


def is_interactive(con: Console | None = None) -> bool:
    """Whether ``con`` (default: the shared console) writes to a live terminal that can redraw a bar.

    True in Jupyter, or when rich sees a terminal that is not ``TERM=dumb`` *and* the stream really is a
    TTY (``FORCE_COLOR`` makes rich treat any stream as a terminal; a log file still gets plain lines).
    """
    con = con or console
    if con.is_jupyter:
        return True
    if not con.is_terminal or con.is_dumb_terminal:
        return False
    isatty = getattr(con.file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@contextmanager
def progress_bar(
    total: int | None, desc: str, *, enabled: bool = True, unit: str = "img"
) -> Iterator[Callable[..., None]]:
    """Context manager yielding ``advance(n=1, **fields)``; a no-op when ``enabled`` is False.

    ``fields`` (for example ``loss=0.41``) are shown after the count. The display is a rich bar on an
    interactive terminal and plain periodic lines elsewhere (see the module docstring). Under torchrun,
    ranks other than 0 show nothing.
    """
    if not enabled or not is_main():
        yield lambda n=1, **_: None
        return
    if not is_interactive():
        with _plain_progress(total, desc, unit) as advance:
            yield advance
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", markup=False),
    ]
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(escape(desc), total=total, info="")

        def advance(n: int = 1, **fields: object) -> None:
            info = " ".join(f"{k}={v}" for k, v in fields.items())
            prog.update(task, advance=n, **({"info": escape(info)} if fields else {}))

        yield advance


@contextmanager
def _plain_progress(total: int | None, desc: str, unit: str) -> Iterator[Callable[..., None]]:
    """Plain-line progress for logs: start, every PLAIN_EVERY_FRACTION or PLAIN_EVERY_SECONDS, end."""
    t0 = time.perf_counter()
    state = {"done": 0, "last_t": t0, "last_step": 0, "info": ""}
    step = max(1, int(total * PLAIN_EVERY_FRACTION)) if total else 0

    def emit(line: str) -> None:
        console.out(line, highlight=False)

    emit(f"{desc}: 0/{total} {unit}" if total else f"{desc}: started")

    def advance(n: int = 1, **fields: object) -> None:
        state["done"] += n
        if fields:
            state["info"] = " " + " ".join(f"{k}={v}" for k, v in fields.items())
        now = time.perf_counter()
        done = state["done"]
        since = now - state["last_t"]
        crossed = bool(step) and done // step > state["last_step"] and (total is None or done < total)
        if not (crossed and since >= PLAIN_MIN_SECONDS) and since < PLAIN_EVERY_SECONDS:
            return
        if step:
            state["last_step"] = done // step
        state["last_t"] = now
        rate = done / max(now - t0, 1e-9)
        if total:
            eta = format_duration((total - done) / rate) if rate > 0 else "?"
            emit(f"{desc}: {done}/{total} {unit} ({done / total:.0%}), {rate:,.1f} {unit}/s, eta {eta}{state['info']}")
        else:
            emit(f"{desc}: {done} {unit}, {rate:,.1f} {unit}/s{state['info']}")

    try:
        yield advance
    except BaseException:
        emit(f"{desc}: stopped at {state['done']}" + (f"/{total}" if total else "") + f" {unit}")
        raise
    secs = time.perf_counter() - t0
    done = state["done"]
    emit(f"{desc}: done, {done} {unit} in {format_duration(secs)} ({done / max(secs, 1e-9):,.1f} {unit}/s)"
         f"{state['info']}")
