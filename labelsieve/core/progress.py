"""One progress bar for all long work (rich, with count, rate and ETA), and :func:`warn` for messages.

Under torchrun only rank 0 shows progress and warnings (the other ranks do the same work in step with it,
or wait). User text (file, class and model names) never reaches rich as markup: a class named ``[/bold]`` is
printed as written (:func:`rich.markup.escape`, or :class:`rich.text.Text`, which is not parsed).
"""

from __future__ import annotations

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

console = Console(stderr=True)

__all__ = ["RateColumn", "console", "escape", "progress_bar", "warn"]


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr, on one line (not wrapped, so logs can be searched);
    ``message`` is plain text (not rich markup). Rank 0 only under torchrun."""
    if not is_main():
        return
    console.print(Text.assemble(("warning: ", "bold yellow"), message), soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"? {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(
    total: int | None, desc: str, *, enabled: bool = True, unit: str = "img"
) -> Iterator[Callable[..., None]]:
    """Context manager yielding ``advance(n=1, **fields)``; a no-op when ``enabled`` is False (and on ranks
    other than 0 under torchrun)."""
    if not enabled or not is_main():
        yield lambda n=1, **_: None
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
            prog.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance
