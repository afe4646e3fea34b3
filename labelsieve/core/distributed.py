"""Several processes, one job: the process group ``torchrun`` starts, in one place.

``torchrun --nproc-per-node=N [--nnodes=M --rdzv-endpoint=HOST:PORT] -m labelsieve audit …`` starts the
command N times per machine with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. :func:`init` joins those processes into one process group — NCCL when the run is on
CUDA (each process on the GPU ``cuda:LOCAL_RANK``), gloo otherwise — and leaves it at exit. In a plain
process (no ``WORLD_SIZE``, or 1) nothing is started and every helper here answers as a single process
would: rank 0 of 1, barriers and broadcasts return at once, :func:`run_on_main` just calls its function.

What each rank does (docs/architecture.md, "Several processes"):

* **Feature extraction** is split between the ranks (:mod:`labelsieve.features.store`): every rank
  extracts its share of the images the store lacks into the one store, and waits for the others.
* **Detectors** run on rank 0 alone (:func:`run_on_main`), exactly as in one process, so an audit does
  not depend on the number of processes; the other ranks wait. A detector that trains through the image
  tower says so (``Detector.trains_on_every_rank``) and runs on every rank (:func:`run_on_all`): what needs
  the cached features (they are on rank 0) is computed there and sent to all (:func:`computed_on_main`),
  a cache is written by rank 0 and opened by the others (:func:`main_first`), and the training loops run
  under DDP on each rank's share of every epoch: TURN's fine-tuning, DEFT with PEFT and image-level
  co-divide.
* **Training** (``labelsieve train``) runs on every rank under DDP; rank 0 alone writes files.

The waits and object exchanges use a gloo group with a long timeout (:data:`WAIT_TIMEOUT`): rank 0 may
run a detector for hours while the others wait for it.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "ShardSampler",
    "all_gather_object",
    "all_true",
    "barrier",
    "broadcast_object",
    "computed_on_main",
    "env_world_size",
    "from_main",
    "gather_rows",
    "init",
    "is_main",
    "is_sharded",
    "local_rank",
    "main_first",
    "rank",
    "run_on_all",
    "run_on_main",
    "shard_sampler",
    "sharding",
    "share",
    "shutdown",
    "sum_over_ranks",
    "world_size",
]

T = TypeVar("T")

#: How long a rank may wait for the others (rank 0 running a detector, a slow shard of extraction).
WAIT_TIMEOUT = datetime.timedelta(days=7)

_state: dict[str, Any] = {"control": None, "owner": False, "region": None}


# --------------------------------------------------------------------------- the process group


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset): the number of processes of this job."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_rank() -> int:
    """``LOCAL_RANK`` (this process's number on its machine, which picks its GPU); 0 when unset."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def init(device: torch.device | str = "cpu") -> bool:
    """Join the process group torchrun describes; True when this process is one of several.

    A no-op (returning False) in a plain process. The backend is NCCL when ``device`` is a CUDA device
    (which becomes this process's current device), gloo otherwise. Calling it again is harmless; a group
    the caller initialised itself is used as it is.
    """
    dev = torch.device(device)
    if env_world_size() <= 1 and not dist.is_initialized():
        return False
    if not dist.is_available():  # pragma: no cover - torch built without distributed support
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, init_method="env://")
        _state["owner"] = True
        atexit.register(shutdown)
    if _state["control"] is None:
        _state["control"] = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return world_size() > 1


def shutdown() -> None:
    """Leave the process group this module started (called at exit; safe to call twice)."""
    if _state["owner"] and dist.is_initialized():
        dist.destroy_process_group()
    _state.update(control=None, owner=False, region=None)


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the process that writes files and prints."""
    return rank() == 0


def _active() -> bool:
    return world_size() > 1 and _state["control"] is not None


# --------------------------------------------------------------------------- collectives (control plane)


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        dist.barrier(group=_state["control"])


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled; any rank's argument but ``src``'s is ignored)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_state["control"])
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_state["control"])
    return out


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if not _active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_state["control"])
    return t.tolist()


def all_true(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it is True on every rank."""
    if not _active():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_state["control"])
    return tuple(bool(v) for v in t.tolist())


def gather_rows(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each array concatenated (along rows) over the ranks, in rank order, on every rank."""
    if not _active():
        return arrays
    parts = all_gather_object(arrays)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(len(arrays)))


def share(items: Sequence[T]) -> list[T]:
    """This rank's contiguous block of ``items`` (the blocks of all ranks partition ``items`` in order)."""
    n, w, r = len(items), world_size(), rank()
    return list(items[r * n // w: (r + 1) * n // w])


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) copied to every rank's ``module``."""
    if not _active():
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=0)


# --------------------------------------------------------------------------- rank 0 alone


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn(*args, **kwargs)`` on rank 0 alone while the other ranks wait; its result on rank 0, None on
    the others.

    Inside ``fn`` rank 0 works as one process would: :func:`sharding` is False, so
    :func:`labelsieve.core.engine.make_loader` does not split datasets (the other ranks are not there to take
    their share). An exception on rank 0 still releases the others (they then return None), and is raised on
    rank 0. In a single process this is ``fn(*args, **kwargs)``.
    """
    if not _active():
        return fn(*args, **kwargs)
    if is_main():
        _state["region"] = "alone"
        try:
            return fn(*args, **kwargs)
        finally:
            _state["region"] = None
            barrier()
    barrier()
    return None


def run_on_all(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn(*args, **kwargs)`` on every rank (work split between them inside, e.g. DDP training); its
    result on rank 0, None on the others. In a single process this is ``fn(*args, **kwargs)``."""
    out = fn(*args, **kwargs)
    return out if is_main() else None


def computed_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` computed on rank 0 alone (it may read what only rank 0 holds, such as the
    cached features) and its result sent to every rank. Where the ranks are not all here (one process, or
    inside :func:`run_on_main`) this is ``fn(*args, **kwargs)``."""
    if not sharding():
        return fn(*args, **kwargs)
    return broadcast_object(run_on_main(fn, *args, **kwargs))


def main_first(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0 while the others wait, then on the others: for work rank 0 does once
    and the others reuse (a cache it writes and they open). Where the ranks are not all here this is
    ``fn(*args, **kwargs)``."""
    if not sharding():
        return fn(*args, **kwargs)
    out = run_on_main(fn, *args, **kwargs)
    return out if is_main() else fn(*args, **kwargs)  # type: ignore[return-value]


def from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank when the ranks are all here; ``obj`` otherwise (one process, or inside
    :func:`run_on_main`, where a broadcast would wait for ranks that are not there)."""
    return broadcast_object(obj) if sharding() else obj


def sharding() -> bool:
    """True when work may be split between the ranks: several processes, all of them at the same point
    (not inside :func:`run_on_main`)."""
    return _active() and _state["region"] is None


# --------------------------------------------------------------------------- sharded loading


class ShardSampler(torch.utils.data.Sampler[int]):
    """This rank's share of an order of indices drawn once (by rank 0) for all ranks.

    The order is padded by repeating its start so every rank gets the same number of indices (ranks must
    take the same number of steps); rank ``r`` takes positions ``r, r + W, r + 2W, …``.
    """

    def __init__(self, order: np.ndarray, *, num_replicas: int, rank: int) -> None:
        order = np.asarray(order, dtype=np.int64)
        per = -(-len(order) // num_replicas) if len(order) else 0
        padded = np.resize(order, per * num_replicas) if len(order) else order
        self.indices = padded[rank::num_replicas].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_sampler(dataset: Any, *, shuffle: bool, seed: int,
                  sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.Sampler:
    """This rank's sampler over ``dataset``: a ``DistributedSampler`` (shuffled from ``seed`` when
    ``shuffle``), or the given ``sampler``'s draws (made on rank 0) split into :class:`ShardSampler` shares."""
    if sampler is None:
        return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                                                   seed=int(seed), drop_last=False)
    order = broadcast_object(np.fromiter(iter(sampler), dtype=np.int64) if is_main() else None)
    return ShardSampler(order, num_replicas=world_size(), rank=rank())


def is_sharded(loader: Any) -> bool:
    """True when ``loader`` serves this rank's share of its dataset (made by :func:`shard_sampler`)."""
    return sharding() and isinstance(getattr(loader, "sampler", None),
                                    (torch.utils.data.DistributedSampler, ShardSampler))
