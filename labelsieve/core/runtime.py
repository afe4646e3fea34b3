"""Device choice, mixed precision, seeding and package versions: the run environment in one place."""

from __future__ import annotations

import platform
import random
import resource
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from labelsieve.core.defaults import AMP_MODES
from labelsieve.core.distributed import env_world_size, local_rank
from labelsieve.core.errors import ParameterError, check_param


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to run on.

    Parameters
    ----------
    device : str or torch.device, optional
        ``None`` or ``"auto"``: CUDA if available, else CPU. Otherwise any torch device string
        (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``). Under torchrun (``WORLD_SIZE`` > 1), ``auto``
        and ``"cuda"`` mean this process's GPU, ``cuda:LOCAL_RANK``.

    Returns
    -------
    torch.device

    Raises
    ------
    ParameterError
        For an unknown device string, or a CUDA/MPS device this machine does not have.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParameterError(f"The 'device' parameter must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'. "
                             f"Got {device!r} instead.") from exc
    if dev.type == "cuda" and dev.index is None and env_world_size() > 1:
        dev = torch.device("cuda", local_rank())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(f"Device {str(device)!r} was requested but CUDA is not available on this "
                                 "machine. Pass --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParameterError(f"Device {str(device)!r} does not exist: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s).")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ParameterError("Device 'mps' was requested but is not available. Pass --device cpu (or auto).")
    return dev


def check_amp(owner: str, amp: object) -> None:
    """Raise :class:`ParameterError` unless ``amp`` is one of :data:`~labelsieve.core.defaults.AMP_MODES`."""
    check_param(owner, "amp", amp, amp in AMP_MODES, f"one of {', '.join(map(repr, AMP_MODES))}")


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for training on ``device``: None (float32) off CUDA or with ``amp="off"``;
    bfloat16 for ``"bf16"`` or ``"auto"`` on GPUs that support it; float16 otherwise (with a GradScaler)."""
    check_amp("autocast_dtype", amp)
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device).

    Parameters
    ----------
    seed : int
        A non-negative integer.
    """
    check_param("seed_everything", "seed", seed, isinstance(seed, (int, np.integer)) and seed >= 0,
                "a non-negative int")
    random.seed(int(seed))
    np.random.seed(int(seed) % (2**32))
    torch.manual_seed(int(seed))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(seed))


def versions() -> dict[str, str]:
    """Versions of labelsieve and the libraries that decide its numbers."""
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
