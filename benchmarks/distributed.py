"""Feature extraction with 1 and 2 processes (torchrun, gloo) on this CPU machine.

What ``torchrun --nproc-per-node=2 -m labelsieve audit …`` gains on a 2-core machine: the ranks share the
images the feature store lacks (docs/architecture.md, "Several processes"). Data: 400 Imagenette training
images (``labelsieve.testing.extract_subset``, seed 0), the mini CLIP, batch 64, 0 and 1 loader workers per
process, torch threads = cores / processes (2 threads for 1 process, 1 each for 2), a fresh feature store
per run, 2 rounds with the process counts interleaved; and a control, 1 process on 1 thread. It runs
``benchmarks/device/scale_gpus.py`` with these settings, extraction only, into
``benchmarks/results/distributed.{jsonl,md}``::

    PYTHONPATH=$PWD nice -n 10 python benchmarks/distributed.py

Timings on a shared machine are contaminated by other work: every row records the load average.
"""

from __future__ import annotations

import sys
from pathlib import Path

from labelsieve import testing

sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))
from scale_gpus import main  # noqa: E402

if __name__ == "__main__":
    common = {"device": "cpu", "model": str(testing.mini_clip_dir()), "pretrained": "default", "data": "imagenette:400",
              "batch": 64, "deft_images": 0, "repeats": 2, "name": "distributed",
              "out": str(Path(__file__).resolve().parent / "results")}
    for workers in (0, 1):
        main(sys.argv[1:], procs="1,2", workers=workers, **common)
    # the control: 1 process on 1 thread, to tell the gain of a second process from that of a second thread
    main(sys.argv[1:], procs="1", workers=0, threads=1, **common)
