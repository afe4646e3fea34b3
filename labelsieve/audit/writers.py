"""audit.csv and audit.json writers (atomic), and the summary printed at the end of a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from labelsieve.core.io import atomic_open, write_json
from labelsieve.core.progress import console

__all__ = ["print_summary", "write_csv", "write_json"]


def write_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a table as UTF-8 CSV atomically. Floats keep 6 significant digits."""
    with atomic_open(path) as f:
        table.to_csv(f, index=False, float_format="%.6g", lineterminator="\n")
    return Path(path)


def print_summary(summary: dict[str, Any], files: dict[str, Path], *, top: int = 10) -> None:
    """A short rich summary: counts, noise estimate, the noisiest classes, where the files are."""
    t = Table(title=f"labelsieve audit — {summary.get('method')} on {summary.get('n_images')} images",
              show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", str(summary.get("model", {}).get("name")))
    t.add_row("flagged", f"{summary['n_flagged']} ({summary['noise_rate']:.1%} of readable images)")
    t.add_row("expected noise", f"{summary['noise_rate_expected']:.1%} (mean of 1 − p_clean)")
    t.add_row("unreadable", str(summary["n_unreadable"]))
    t.add_row("duplicates", str(summary["n_duplicates"]))
    t.add_row("rule", summary["decision_rule"])
    info = summary.get("detector_info") or {}
    runs = [("", info)] + [(f"{m.get('member')}: ", m.get("info") or {}) for m in info.get("members", [])]
    paths = [f"{who}{i['path']} ({i['path_reason']})" for who, i in runs if i.get("path_reason")]
    if paths:  # which image-side path a paper-based detector ran (its paper's, or the fallback) and why
        t.add_row("path", "; ".join(paths))
    timings = summary.get("timings", {})
    if timings:
        t.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    console.print(t)
    per = sorted(summary["noise_rate_per_class"].items(), key=lambda kv: -kv[1])[:top]
    ct = Table(title="noisiest classes (share flagged)")
    ct.add_column("class")
    ct.add_column("flagged", justify="right")
    ct.add_column("images", justify="right")
    for c, r in per:
        ct.add_row(c, f"{r:.1%}", str(summary["class_counts"].get(c, "")))
    console.print(ct)
    for w in summary.get("warnings", []):
        console.print(f"[bold yellow]warning:[/bold yellow] {w}")
    for name, path in files.items():
        console.print(f"[bold]{name}[/bold]: {path}")
