"""Input reading and validation: every user mistake gives one clear message naming the row."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from labelsieve.core.errors import DataError
from labelsieve.data import UnreadableImage, decode_image, load_images


@pytest.fixture()
def tree(tmp_path, eurosat_small):
    """A small ImageFolder tree and a CSV over the same real images."""
    src_root, src_csv = eurosat_small
    lines = src_csv.read_text().splitlines()[1:31]
    root = tmp_path / "imgs"
    for line in lines:
        p, lab = line.split(",")
        (root / lab).mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / p, root / lab / p)
    return root


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def test_imagefolder_and_csv_agree(tree, tmp_path):
    a = load_images(tree)
    rows = "path,label\n" + "\n".join(f"{p},{a.classes[y]}" for p, y in zip(a.paths, a.labels, strict=True))
    b = load_images(tree, write(tmp_path / "l.csv", rows))
    assert a.paths == b.paths and a.classes == b.classes
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(a) == 30 and a.n_classes >= 2


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_delimiters_bom_and_custom_columns(tree, tmp_path, sep):
    a = load_images(tree)
    body = "\n".join(f"{p}{sep}{a.classes[y]}" for p, y in zip(a.paths, a.labels, strict=True))
    csv = write(tmp_path / "l.csv", f"\ufefffile{sep}klass\n{body}\n")
    b = load_images(tree, csv, path_column="file", label_column="klass")
    np.testing.assert_array_equal(a.labels, b.labels)


def test_classnames_file(tree, tmp_path):
    a = load_images(tree)
    cn = write(tmp_path / "names.csv", f"{a.classes[0]},first class\n")
    b = load_images(tree, classnames=cn)
    assert b.classnames[0] == "first class" and b.classnames[1] == a.classes[1].replace("_", " ")
    bad = write(tmp_path / "names2.csv", "NoSuchClass,whatever\n")
    with pytest.raises(DataError, match="NoSuchClass.*no images"):
        load_images(tree, classnames=bad)


def test_missing_file_names_row_and_fix(tree, tmp_path):
    csv = write(tmp_path / "l.csv", "path,label\nForest/nope.jpg,Forest\n")
    with pytest.raises(DataError, match=r"not found.*line 2: Forest/nope.jpg.*Fix the paths or remove"):
        load_images(tree, csv)


def test_path_outside_root(tree, tmp_path):
    (tmp_path / "outside.jpg").write_bytes(b"x")
    csv = write(tmp_path / "l.csv", "path,label\n../outside.jpg,a\nx.jpg,b\n")
    with pytest.raises(DataError, match=r"outside the image folder.*line 2"):
        load_images(tree, csv)


def test_empty_csv_blank_label_single_class_empty_class(tree, tmp_path):
    with pytest.raises(DataError, match="CSV is empty"):
        load_images(tree, write(tmp_path / "e.csv", ""))
    with pytest.raises(DataError, match="header but no rows"):
        load_images(tree, write(tmp_path / "h.csv", "path,label\n"))
    a = load_images(tree)
    p0, p1 = a.paths[0], a.paths[1]
    with pytest.raises(DataError, match=r"empty 'label' \(line 3\)"):
        load_images(tree, write(tmp_path / "b.csv", f"path,label\n{p0},x\n{p1},\n"))
    with pytest.raises(DataError, match="at least two classes"):
        load_images(tree, write(tmp_path / "s.csv", f"path,label\n{p0},x\n{p1},x\n"))
    with pytest.raises(DataError, match="no column 'label'"):
        load_images(tree, write(tmp_path / "c.csv", f"path,lab\n{p0},x\n"))
    (tree / "EmptyClass").mkdir()
    with pytest.raises(DataError, match="class folder.*with no images: EmptyClass"):
        load_images(tree)
    with pytest.raises(DataError, match="Image folder not found"):
        load_images(tmp_path / "nowhere")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_any_mode_decodes_to_rgb(mode):
    base = Image.new("RGB", (8, 6), (200, 100, 50))
    im = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (8, 6))
    fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK") else "PNG"
    out = decode_image(_encode(im, fmt))
    assert out.mode == "RGB" and out.size == (8, 6)


def test_exif_orientation_applied():
    im = Image.new("RGB", (10, 4), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_encode(im, "JPEG", exif=exif))
    assert out.size == (4, 10)


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_unreadable_images_raise_unreadable(data, eurosat_small):
    if data is None:  # truncated JPEG
        root, csv = eurosat_small
        first = csv.read_text().splitlines()[1].split(",")[0]
        data = (root / first).read_bytes()[:200]
    with pytest.raises(UnreadableImage):
        decode_image(data, name="x.jpg")
