"""Device choice, seeding and package versions: the run environment in one place."""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` or the best available one (CUDA, then CPU). ``"auto"`` means the same as None."""
    if device is not None and str(device) != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def versions() -> dict[str, str]:
    """Versions of labelsieve and the libraries that decide its numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("labelsieve", "torch", "torchvision", "open_clip_torch", "timm", "numpy", "faiss-cpu",
                "scikit-learn", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    out["cuda"] = torch.version.cuda or "none"
    return out


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak resident memory of this process (MiB), or peak CUDA memory when ``device`` is CUDA."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
