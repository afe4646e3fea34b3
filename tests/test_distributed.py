"""Several processes under torchrun (2 CPU processes, gloo): the audit equals the one-process audit, a rank
that dies loses only its unfinished chunk, training under DDP equals training in one process, and TURN's
fine-tuning, DEFT with PEFT and image-level co-divide train under DDP on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dist_job import SUBSET, TOWER_DETECTORS, tower_detector
from dist_job import train as train_linear

from labelsieve import api, testing
from labelsieve.data import load_images
from labelsieve.features import extract_features
from labelsieve.models.encoders import create_encoder

JOB = Path(__file__).with_name("dist_job.py")


def torchrun(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=2 ARGS`` with this interpreter and this checkout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(JOB.parent.parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                         env=env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def audits(mini_clip_dir, tmp_path_factory):
    """(images, 1-process audit folder and cache, 2-process audit folder and cache); the 2-process audit
    finishes an extraction that a dying rank interrupted."""
    tmp = tmp_path_factory.mktemp("dist")
    root, csv = testing.extract_subset(SUBSET["name"], per_class=SUBSET["per_class"], seed=SUBSET["seed"])
    common = {"method": "turn", "model": str(mini_clip_dir), "num_workers": 0, "progress": False, "quiet": True}
    api.audit(root, csv, out_dir=tmp / "one", cache_dir=tmp / "cache1", params={"finetune": False}, **common)
    died = torchrun(str(JOB), "extract", str(tmp / "cache2"), "8", expect_ok=False)
    assert died.returncode != 0
    torchrun("-m", "labelsieve", "audit", str(root), str(csv), "-o", str(tmp / "two"), "--method", "turn",
             "--no-finetune", "--model", str(mini_clip_dir), "--cache-dir", str(tmp / "cache2"), "--workers", "0",
             "--no-progress")
    return load_images(root, csv), tmp


def test_two_process_audit_equals_one_process_audit(audits, mini_clip_dir):
    images, tmp = audits
    one, two = (json.loads((tmp / d / "audit.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    # the dying rank's committed chunks were kept: the rerun extracted only the rest
    assert one["n_extracted"] == len(images) and 0 < two["n_extracted"] < len(images)
    encoder = create_encoder(str(mini_clip_dir), device="cpu")
    f1, f2 = (extract_features(images, encoder, cache_dir=tmp / c, num_workers=0, progress=False)
              for c in ("cache1", "cache2"))
    assert f2.n_extracted == 0 and f2.ok.all()
    # no two ranks (nor the run that died and its rerun) wrote the same entry
    stored = np.concatenate([np.load(p) for p in (tmp / "cache2").rglob("chunk-*.digests.npy")])
    assert len(stored) == len(np.unique(stored)) == len(images)
    v1, v2 = np.asarray(f1.vectors, dtype=np.float32), np.asarray(f2.vectors, dtype=np.float32)
    assert np.abs(v1 - v2).max() <= 2e-3  # the same features to fp16 precision (|v| <= 1)
    a1, a2 = (pd.read_csv(tmp / d / "audit.csv") for d in ("one", "two"))
    assert list(a1["path"]) == list(a2["path"]) and len(a1) == len(images)
    assert list(a1["is_noisy"]) == list(a2["is_noisy"]) and 0 < a1["is_noisy"].sum() < len(a1)
    assert list(a1["suggested_label"]) == list(a2["suggested_label"])
    assert np.allclose(a1["p_clean"], a2["p_clean"], atol=1e-3)


def test_training_under_ddp_equals_one_process(audits):
    _images, tmp = audits
    out = tmp / "train"
    out.mkdir()
    torchrun(str(JOB), "train", str(out), str(tmp / "two" / "audit.csv"))
    r0, r1 = (dict(np.load(out / f"train-{r}.npz")) for r in (0, 1))
    for key in r0:  # every rank ends with the same model and the same gathered predictions
        assert np.allclose(r0[key], r1[key], atol=1e-6), key
    for step in ("default", "method"):
        ref = train_linear(step, shuffle=False)  # one process: each 8-image batch is the two ranks' 4 + 4
        for key in ("weight", "bias", "logits", "loss"):
            assert np.allclose(r0[f"{step}_ordered_{key}"], ref[key], atol=1e-5), (step, key)
        assert list(r0[f"{step}_ordered_n"]) == [40] * 3 and list(r0[f"{step}_shuffled_n"]) == [40] * 3
        assert r0[f"{step}_shuffled_loss"][-1] < r0[f"{step}_shuffled_loss"][0]  # it learns when shuffled too
    # labelsieve train under DDP: rank 0 alone exports, and counts every rank's images
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["training"]["n_train"] + meta["training"]["n_val"] == 50
    assert (out / "model" / "model.safetensors").is_file()


def test_detectors_that_train_through_the_tower_train_under_ddp(tmp_path):
    """Image-level co-divide, DEFT with VPT-deep (eval-pass and batch selection) and TURN's fine-tuning, through a
    tiny random ViT on 50 images with 40 % noise, run on both ranks as the audit runs them (only rank 0 holds
    the features): every row is trained once per epoch between the two ranks (not twice; TURN: each epoch's
    selection once), both ranks end with the same trained parameters (DDP averaged the gradients from rank 0's
    broadcast start), and every row gets a score, from the rank that saw it under batch selection. Flags are
    not compared with one process's: each rank's half batch draws other augmentations, as another seed would
    (TURN through ``torchrun -m labelsieve audit`` on the mini CLIP at 64 px: 48 of 50 flags equal)."""
    torchrun(str(JOB), "tower", str(tmp_path))
    for key in TOWER_DETECTORS:
        two = json.loads((tmp_path / f"{key}.json").read_text())
        one = tower_detector(key, tmp_path / "one" / "cache")
        assert one is not None
        assert (one["ranks"], two["ranks"]) == (1, 2) and one["path"] == two["path"] != "none", key
        if key == "turn":  # the same step-1 selection (rank 0's probe); then each epoch's selection, once
            assert one["n_subsample"][0] == two["n_subsample"][0] and one["n"] == one["n_subsample"], key
            assert two["n"] == two["n_subsample"] and all(0 < n < 50 for n in two["n"]), key
        elif key == "codivide":
            # the warm-up epoch: every row once between the ranks; the co-divide epoch (DivideMix's batches): the
            # labelled rows once between the ranks (not once per rank), each step beside a batch of unlabelled rows
            assert one["n"][0] == two["n"][0] == [50, 50], key
            for res, world in ((one, 1), (two, 2)):
                for k in range(2):
                    n, n_lab, steps = res["n"][1][k], res["n_labelled"][2 + k], res["steps"][1][k]
                    assert abs(steps - -(-n_lab // 10)) <= 1 and 0 < n_lab < 50, (key, world, k, n_lab, steps)
                    assert n_lab - world <= n <= n_lab + world + 10 * steps, (key, world, k, n, n_lab, steps)
        else:
            assert one["n"] == two["n"] == [50, 50], key
        r0, r1 = (json.loads((tmp_path / f"{key}-params-{r}.json").read_text()) for r in (0, 1))
        assert r0.keys() == r1.keys() and len(r0) >= 2, key
        for name in r0:
            assert np.allclose(r0[name], r1[name], rtol=1e-5, atol=1e-6), (key, name)
        for res in (one, two):
            assert np.isfinite(res["p_clean"]).all() and np.allclose(res["probs_sum"], 1.0, atol=1e-5), key
            if key == "codivide":
                assert not np.allclose(res["p_net1"], res["p_net2"]) and all(0 < n < 50 for n in res["n_labelled"][2:])
            if key == "deft-batch":  # scored by the batches of the last epoch: rank 1's rows too, not the defaults
                assert not np.any(np.array(res["p_clean"]) == 1.0), key


def test_two_processes_over_four_shards_equal_one_and_read_no_shard_twice(mini_clip_dir, tmp_path):
    """``torchrun`` with 2 processes audits 4 WebDataset shards as 1 process does (same flags), and no shard is
    read twice: each is indexed by one rank and its images read by one rank."""
    root, csv = testing.extract_subset("cifar10", 200, first=True)
    testing.write_shards(root, csv, tmp_path / "shards", shards=4)
    args = [str(tmp_path / "shards"), "--method", "knn", "--model", str(mini_clip_dir), "--workers", "0",
            "--no-progress", "--no-html", "--no-near-duplicates"]
    one = api.audit(tmp_path / "shards", method="knn", model=str(mini_clip_dir), cache_dir=tmp_path / "cache1",
                    out_dir=tmp_path / "one", num_workers=0, progress=False, quiet=True, html=False,
                    duplicate_threshold=None)
    torchrun(str(JOB), "audit", str(tmp_path / "opens"), *args, "-o", str(tmp_path / "two"), "--cache-dir",
             str(tmp_path / "cache2"))
    two = pd.read_csv(tmp_path / "two" / "audit.csv")
    summary = json.loads((tmp_path / "two" / "audit.json").read_text())
    assert summary["processes"] == 2 and summary["n_extracted"] == 200
    a = one.table.set_index("path").loc[two["path"]]
    assert list(a["is_noisy"]) == list(two["is_noisy"]) and 0 < two["is_noisy"].sum() < 200
    assert list(a["suggested_label"]) == list(two["suggested_label"])
    assert np.allclose(a["p_clean"], two["p_clean"], atol=1e-3)
    opens = [line.split() for r in (0, 1) for line in (tmp_path / f"opens-{r}").read_text().splitlines()]
    for phase in ("index", "read"):
        by_shard: dict[str, set[str]] = {}
        for rank, ph, name in opens:
            if ph == phase:
                by_shard.setdefault(name, set()).add(rank)
        assert sorted(by_shard) == [f"shard-00000{k}.tar" for k in range(4)], phase
        assert all(len(ranks) == 1 for ranks in by_shard.values()), (phase, by_shard)  # one rank per shard
        assert {r for ranks in by_shard.values() for r in ranks} == {"0", "1"}, phase  # both ranks did their share
        counts = [sum(1 for _, ph, n in opens if ph == phase and n == name) for name in by_shard]
        assert counts == [1, 1, 1, 1], (phase, opens)  # each shard opened once for this
