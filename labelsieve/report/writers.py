"""audit.csv and audit.json writers (atomic), and the summary printed at the end of a run."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a table as UTF-8 CSV atomically (temporary file + rename). Floats keep 6 digits."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(p)
    try:
        table.to_csv(tmp, index=False, float_format="%.6g")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    return o


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write JSON atomically; NaN becomes null, numpy types become Python ones."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(p)
    try:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def print_summary(summary: dict[str, Any], files: dict[str, Path], *, top: int = 10) -> None:
    """A short rich summary: counts, noise estimate, the noisiest classes, where the files are."""
    from rich.table import Table

    from labelsieve.progress import console

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
