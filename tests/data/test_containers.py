"""Images where they live: WebDataset shards, Parquet files and Hugging Face datasets folders read as an image
folder is read (issue 20): one name per sample, the same labels and content digests, bad input named with its
shard or file and member or row, the container index memoised (and rebuilt when damaged), cleaned copies."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelsieve import testing
from labelsieve.core.errors import DataError, OutputError
from labelsieve.core.paths import read_regular
from labelsieve.data import load_images
from labelsieve.data import webdataset as wds
from labelsieve.data.containers import expand_pattern, find_containers, write_cleaned_copy
from labelsieve.data.hashing import ContentHasher, digest_list
from labelsieve.data.indexmemo import IndexMemo
from labelsieve.features import extract_features


@pytest.fixture(scope="module")
def folder(eurosat_small, tmp_path_factory):
    """(root, csv) of 24 real EuroSAT images (3 per class of the first 8 rows of each class)."""
    root, csv = eurosat_small
    lines = csv.read_text().splitlines()
    out = tmp_path_factory.mktemp("folder") / "labels.csv"
    out.write_text("\n".join([lines[0], *lines[1:200:8][:24]]) + "\n")
    return root, out


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A fresh cache; containers written just now are memoised (in use, files modified in the last 2 s are not)."""
    monkeypatch.setattr("labelsieve.data.indexmemo.RACY_SECONDS", -1.0)
    return tmp_path / "cache"


def _same_as_folder(images, ref, hasher_db):
    assert images.classes == ref.classes and np.array_equal(images.labels, ref.labels)
    files = ContentHasher(hasher_db).digests([ref.root / p for p in ref.paths])
    assert digest_list(images.members.digests) == files
    for i in (0, len(ref) // 2, len(ref) - 1):
        assert images.locate(i).read_bytes() == (ref.root / ref.paths[i]).read_bytes()


@pytest.mark.parametrize("label", ["cls", "json", "txt"])
def test_shards_read_as_the_folder_with_labels_from_their_members(folder, tmp_path, cache, label):
    root, csv = folder
    ref = load_images(root, csv)
    testing.write_shards(root, csv, tmp_path / "s", shards=4, label=label)
    for spec in (tmp_path / "s", str(tmp_path / "s" / "shard-{000000..000003}.tar"), str(tmp_path / "s" / "*.tar")):
        images = load_images(spec, cache_dir=cache)
        assert images.kind == "webdataset" and len(images) == len(ref)
        assert images.paths[0] == "shard-000000.tar/" + os.path.splitext(ref.paths[0])[0].replace("/", "_") + ".jpg"
        _same_as_folder(images, ref, cache / 'h.sqlite')


def test_parquet_and_hf_saved_folders_read_as_the_folder(folder, tmp_path, cache):
    root, csv = folder
    ref = load_images(root, csv)
    testing.write_parquet(root, csv, tmp_path / "p", files=2, row_group_size=5)
    testing.write_parquet(root, csv, tmp_path / "t", files=1, class_label=False)
    testing.write_hf_saved(root, csv, tmp_path / "hf", files=2)
    for spec, kind in ((tmp_path / "p", "parquet"), (tmp_path / "t", "parquet"), (tmp_path / "hf", "arrow")):
        images = load_images(spec, cache_dir=cache)
        assert images.kind == kind and len(images) == len(ref)
        _same_as_folder(images, ref, cache / 'h.sqlite')
    one = load_images(tmp_path / "p" / "train-00001-of-00002.parquet", cache_dir=cache)
    assert one.paths[0] == "train-00001-of-00002.parquet#0" and len(one) == len(ref) - len(ref) // 2
    # the ClassLabel names came from the Hugging Face metadata, not the class numbers
    assert set(one.classes) <= set(ref.classes)


def test_brace_patterns_and_missing_files(tmp_path):
    for name in ("a-000.tar", "a-001.tar", "a-002.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_pattern(str(tmp_path / "a-{000..002}.tar"))] == ["a-000.tar", "a-001.tar",
                                                                                    "a-002.tar"]
    assert [p.name for p in expand_pattern(str(tmp_path / "{b,a-001}.tar"))] == ["b.tar", "a-001.tar"]
    with pytest.raises(DataError, match=r"1 file\(s\) the pattern names do not exist .*a-003.tar"):
        expand_pattern(str(tmp_path / "a-{000..003}.tar"))
    with pytest.raises(DataError, match="mixes parquet, webdataset"):
        (tmp_path / "c.parquet").write_bytes(b"")
        find_containers(str(tmp_path / "{b.tar,c.parquet}"))


def test_labels_csv_keyed_by_key_or_sample_name_sets_the_rows_and_their_order(folder, tmp_path, cache):
    root, csv = folder
    testing.write_shards(root, csv, tmp_path / "s", shards=2, label="none")
    ref = load_images(root, csv)
    keys = [os.path.splitext(p)[0].replace("/", "_") for p in ref.paths]
    rows = list(zip(keys, ref.label_names(), strict=True))[::-1][:10]
    (tmp_path / "k.csv").write_text("key,label\n" + "\n".join(f"{k},{lab}" for k, lab in rows) + "\n")
    by_key = load_images(tmp_path / "s", tmp_path / "k.csv", cache_dir=cache)
    assert [p.rsplit("/", 1)[1][:-4] for p in by_key.paths] == [k for k, _ in rows]
    assert by_key.label_names() == [lab for _, lab in rows]
    (tmp_path / "n.csv").write_text("path,label\n" + "\n".join(f"{p},{lab}" for p, lab in
                                                                zip(by_key.paths, by_key.label_names(),
                                                                    strict=True)) + "\n")
    assert load_images(tmp_path / "s", tmp_path / "n.csv", cache_dir=cache).paths == by_key.paths
    (tmp_path / "twice.csv").write_text(f"key,label\n{rows[0][0]},{rows[0][1]}\n{rows[0][0]},{rows[0][1]}\n")
    with pytest.raises(DataError, match=r"1 row\(s\) list an image that an earlier row already lists .*line 3 "
                                        r"repeats line 2"):
        load_images(tmp_path / "s", tmp_path / "twice.csv", cache_dir=cache)
    (tmp_path / "bad.csv").write_text("path,label\nnosuchkey,x\n" + f"{rows[0][0]},{rows[0][1]}\n")
    with pytest.raises(DataError, match=r"1 row\(s\) name no sample .*line 2: nosuchkey"):
        load_images(tmp_path / "s", tmp_path / "bad.csv", cache_dir=cache)


def test_a_member_with_no_label_is_named(folder, tmp_path, cache):
    root, csv = folder
    shards = testing.write_shards(root, csv, tmp_path / "s", shards=2)
    # rewrite shard 1 without its first sample's label member
    members = []
    with tarfile.open(shards[1]) as tf:
        for m in tf.getmembers():
            members.append((m.name, tf.extractfile(m).read()))
    gone = next(n for n, _ in members if n.endswith(".cls"))
    with tarfile.open(shards[1], "w") as tf:
        for n, data in members:
            if n != gone:
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    image = gone[:-4] + ".jpg"
    with pytest.raises(DataError, match=rf"1 sample\(s\) have no label .*shard-000001.tar/{image}"):
        load_images(tmp_path / "s", cache_dir=cache)


def test_a_truncated_shard_is_named_and_the_other_indexes_are_kept(folder, tmp_path, cache, monkeypatch):
    root, csv = folder
    shards = testing.write_shards(root, csv, tmp_path / "s", shards=4)
    good = shards[2].read_bytes()
    shards[2].write_bytes(good[: len(good) // 2 + 100])
    with pytest.raises(DataError, match=r"shard-000002.tar: the tar file is truncated .*after member '.*\.(jpg|cls)'"):
        load_images(tmp_path / "s", cache_dir=cache)
    assert len(list((cache / "containers").glob("*.json"))) == 3  # the three good shards' indexes were kept
    shards[2].write_bytes(good)
    read = []
    real = wds.index_shard
    monkeypatch.setattr("labelsieve.data.containers.index_shard", lambda p, **k: read.append(p.name) or real(p, **k))
    assert len(load_images(tmp_path / "s", cache_dir=cache)) == 24
    assert read == ["shard-000002.tar"]  # only the repaired shard is read again


def test_a_damaged_header_and_a_key_with_two_images_are_named(tmp_path):
    tar = tmp_path / "x.tar"
    with tarfile.open(tar, "w") as tf:
        for name in ("a.jpg", "a.png", "a.cls"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DataError, match=r"x.tar: sample 'a' has two images \('a.jpg' and 'a.png'\)"):
        wds.index_shard(tar, shard="x.tar")
    data = bytearray(tar.read_bytes())
    data[1024 + 10] ^= 0xFF  # the second header
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"x.tar: the tar header at byte 1024 is damaged .*after member 'a.jpg'"):
        wds.index_shard(tar, shard="x.tar")


def test_parquet_without_the_image_column_is_named_with_its_columns(folder, tmp_path, cache):
    root, csv = folder
    testing.write_parquet(root, csv, tmp_path / "p", files=1)
    f = tmp_path / "p" / "train-00000-of-00001.parquet"
    t = pq.read_table(f).rename_columns(["picture", "label"])
    pq.write_table(t, f)
    with pytest.raises(DataError, match=r"train-00000-of-00001.parquet: no image column 'image' \(its columns: "
                                        r"picture, label\)\. .*--image-column"):
        load_images(tmp_path / "p", cache_dir=cache)
    assert len(load_images(tmp_path / "p", cache_dir=cache, image_column="picture")) == 24
    with pytest.raises(DataError, match="no label column 'klass'"):
        load_images(tmp_path / "p", cache_dir=cache, image_column="picture", label_column="klass")
    t = pa.table({"image": pa.array(["a"] * 3), "label": pa.array([1, 2, 3])})
    pq.write_table(t, f)
    with pytest.raises(DataError, match=r"column 'image' holds string, not image bytes"):
        load_images(tmp_path / "p", cache_dir=cache)


def test_a_datasetdict_folder_names_its_splits(tmp_path):
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=r"DatasetDict with splits train, test: give one split's folder"):
        load_images(tmp_path)


def test_a_damaged_container_index_is_rebuilt_never_used(folder, tmp_path, cache, capsys):
    root, csv = folder
    testing.write_shards(root, csv, tmp_path / "s", shards=2)
    first = load_images(tmp_path / "s", cache_dir=cache)
    npz = sorted((cache / "containers").glob("*.npz"))
    data = bytearray(npz[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz[0].write_bytes(bytes(data))
    again = load_images(tmp_path / "s", cache_dir=cache)
    assert again.paths == first.paths and digest_list(again.members.digests) == digest_list(first.members.digests)
    assert "is damaged" in capsys.readouterr().err
    # a changed shard is indexed again (its stamp changed), never read from the old index
    memo = IndexMemo(cache)
    shard = tmp_path / "s" / "shard-000000.tar"
    assert memo.get(shard) is not None
    os.utime(shard, ns=(1, 1))
    assert memo.get(shard) is None


def test_no_fifo_or_device_is_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.tar")
    assert find_containers(tmp_path) is None or find_containers(tmp_path).files == []
    with pytest.raises(DataError, match="do not exist"):
        expand_pattern(str(tmp_path / "{fifo}.tar"))
    with pytest.raises(OSError, match="a FIFO, not a regular file"):
        read_regular(tmp_path / "fifo.tar")
    with pytest.raises(OSError, match="a device, not a regular file"):
        read_regular("/dev/zero")


def test_cleaned_copies_keep_their_format_drop_and_relabel(folder, tmp_path, cache):
    root, csv = folder
    ref = load_images(root, csv)
    testing.write_shards(root, csv, tmp_path / "s", shards=3, label="json")
    testing.write_parquet(root, csv, tmp_path / "p", files=2, row_group_size=4)
    other = next(c for c in ref.classes if c != ref.label_names()[1])
    for spec, fmt in ((tmp_path / "s", "webdataset"), (tmp_path / "p", "parquet")):
        images = load_images(spec, cache_dir=cache)
        keep = [i for i in range(len(images)) if i % 5 != 0]  # every fifth sample dropped
        labels = [images.label_names()[i] if i != 1 else other for i in keep]  # sample 1 relabelled
        out = tmp_path / f"copy-{fmt}"
        done = write_cleaned_copy(str(spec), [images.paths[i] for i in keep], labels, out, fmt=fmt,
                                  label_column="label" if fmt == "parquet" else None, cache_dir=cache)
        assert done["samples"] == len(keep)
        copy = load_images(out, cache_dir=cache)
        assert copy.label_names() == labels
        assert [copy.locate(k).read_bytes() for k in range(len(copy))] == [images.locate(i).read_bytes()
                                                                          for i in keep]
        if fmt == "webdataset":  # the JSON label member keeps its other fields
            with tarfile.open(out / "shard-000000.tar") as tf:
                meta = json.loads(tf.extractfile(next(m for m in tf.getmembers() if m.name.endswith(".json"))).read())
            assert set(meta) == {"label", "source"}
            assert copy.paths[0] == images.paths[1]  # same shard and member names
        else:  # ClassLabel numbers and the Hugging Face features kept
            t = pq.read_table(out / "train-00000-of-00002.parquet")
            assert pa.types.is_integer(t.schema.field("label").type) and b"huggingface" in t.schema.metadata
        with pytest.raises(DataError, match="in the input's format"):
            write_cleaned_copy(str(spec), [], [], tmp_path / "x", fmt="parquet" if fmt == "webdataset" else
                               "webdataset", cache_dir=cache)
        with pytest.raises(OutputError, match="would replace them"):
            write_cleaned_copy(str(spec), [], [], spec, fmt=fmt, cache_dir=cache)
    shutil.rmtree(tmp_path / "s")


def test_a_shard_truncated_after_indexing_is_reported_and_never_cached_as_bad(folder, tmp_path, cache, mini_clip):
    """The bytes a shard's index hashed cannot be read any more: those rows are unreadable in this run, stored
    under a marker (not under their content digests, which stay extractable), and the shard is indexed again next
    time (and refused, truncated)."""
    root, csv = folder
    shards = testing.write_shards(root, csv, tmp_path / "s", shards=2)
    images = load_images(tmp_path / "s", cache_dir=cache).subset(range(16))
    good = shards[1].read_bytes()
    shards[1].write_bytes(good[:1024])  # shard 1 keeps the start of its first member only
    feats = extract_features(images, mini_clip, cache_dir=cache, num_workers=0, progress=False)
    lost = [i for i, p in enumerate(images.paths) if p.startswith("shard-000001")]
    assert lost and not feats.ok[lost].any() and feats.ok[:lost[0]].all()
    assert all("cannot read" in feats.errors[i] for i in lost)
    with pytest.raises(DataError, match="shard-000001.tar: the tar file is truncated"):
        load_images(tmp_path / "s", cache_dir=cache)
    shards[1].write_bytes(good)
    again = extract_features(load_images(tmp_path / "s", cache_dir=cache).subset(range(16)), mini_clip,
                             cache_dir=cache, num_workers=0, progress=False)
    assert again.ok.all() and again.n_extracted == len(lost)


def test_gnu_long_names_pax_headers_and_dot_slash_members_are_read(tmp_path):
    """The header parser reads what tar writers write: GNU long names, pax headers (long UTF-8 names), ustar
    prefixes, ``./`` members, and skips folders and links."""
    with tarfile.open(tmp_path / "g.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        folder = tarfile.TarInfo("./sub")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        long = "./sub/" + "x" * 150
        for name, data in ((long + ".jpg", b"img1"), (long + ".cls", b"cat"), ("./sub/b.webp", b"img2"),
                           ("./sub/b.json", b'{"label": 3, "other": 1}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("./sub/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "b.webp"
        tf.addfile(link)
    with tarfile.open(tmp_path / "p.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("é" * 120 + ".png", b"img3"), ("é" * 120 + ".txt", b" dog \n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    g = load_images(tmp_path / "g.tar", allow_single_class=True)
    assert g.paths == [f"g.tar/sub/{'x' * 150}.jpg", "g.tar/sub/b.webp"] and g.label_names() == ["cat", "3"]
    assert [g.locate(i).read_bytes() for i in range(2)] == [b"img1", b"img2"]
    p = load_images(tmp_path / "p.tar", allow_single_class=True)
    assert p.paths == ["p.tar/" + "é" * 120 + ".png"] and p.label_names() == ["dog"]
