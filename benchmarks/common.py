"""What the benchmark scripts share: the host record, threads, and append-only JSONL results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def default_threads() -> int:
    """Torch threads for a benchmark: the cores, at most 2 (the reference machine has 2)."""
    return max(1, min(2, os.cpu_count() or 1))


def host_info(threads: int) -> dict[str, Any]:
    """The machine a row was measured on, recorded with every row."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a results file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    """Append one result row; finished rows survive an interrupted run."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def prepare_run(out: str, work: str, threads: int, results: str) -> tuple[Path, Path, Path, set[str]]:
    """Set torch threads, make the output and work folders; returns (out, work, results file, finished runs)."""
    torch.set_num_threads(threads)
    out_p, work_p = Path(out), Path(work)
    out_p.mkdir(parents=True, exist_ok=True)
    work_p.mkdir(parents=True, exist_ok=True)
    jsonl = out_p / results
    return out_p, work_p, jsonl, {r["run"] for r in read_jsonl(jsonl)}


def mini_clip_encoder() -> Any:
    """The stand-in CLIP of ../shared/models/mini-clip, as the grid's benchmarks read it."""
    from labelsieve import testing
    from labelsieve.models.encoders import create_encoder

    return create_encoder(str(testing.shared_dir() / "models" / "mini-clip"))


def mini_clip_cache(root: str | Path, dataset: str) -> Path:
    """The mini-CLIP feature cache of a grid data set under ``root``: one per family (``cifar10n-aggre`` and
    ``cifar10n-worst`` share ``cifar10n``), as benchmarks/detection.py fills it."""
    return Path(root) / "mini-clip" / dataset.split("-")[0]
