"""ImageNet-style trees to the dataset format: layout, decoding rules, manifest, errors, MPI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from mpinewton.data import imagenet
from mpinewton.data.hdf5 import DataError, inspect_dataset, read_shard
from mpinewton.data.imagenet import (
    ImageReadError,
    convert_imagenet,
    decode_image,
    manifest_path,
    read_manifest,
    scan_image_tree,
)

ROOT = Path(__file__).resolve().parents[2]
# Through the scripts' wrapper, as every test's mpirun (see tests/mpijobs.py).
MPIRUN = str(ROOT / "scripts" / "mpirun.sh") if shutil.which("mpirun") else None
SYNSETS = ["n01440764", "n01443537", "n01484850"]
SHAPES = [(17, 29), (29, 17), (23, 11), (8, 40), (31, 31), (40, 9)]
SIZE = 32
RED_BGR = (0, 0, 255)


def _image(rng: np.random.Generator, k: int) -> np.ndarray:
    h, w = SHAPES[k % len(SHAPES)]
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def make_tree(root: Path, *, val: str = "folders", per_class: int = 4, seed: int = 0) -> Path:
    """A small ILSVRC tree: 3 classes, odd sizes, and one file of each awkward kind.

    train/n01440764: a pure red PNG named .JPEG, a greyscale JPEG, plain JPEGs
    train/n01443537: a truncated JPEG OpenCV cannot decode, plain JPEGs
    train/n01484850: an empty file, a text file named .JPEG, plain JPEGs
    val: class folders (``val="folders"``), or a flat folder (``"flat"``) for a labels file.
    """
    rng = np.random.default_rng(seed)
    k = 0
    for c, synset in enumerate(SYNSETS):
        folder = root / "train" / synset
        folder.mkdir(parents=True)
        for i in range(per_class):
            cv2.imwrite(str(folder / f"{synset}_{i:02d}.JPEG"), _image(rng, k + c))
            k += 1
    first, second, third = (root / "train" / s for s in SYNSETS)
    red = np.zeros((9, 13, 3), np.uint8)
    red[:] = RED_BGR
    cv2.imwrite(str(first / "red.png"), red)
    (first / "red.png").rename(first / "a_red.JPEG")  # PNG content, JPEG name; sorts first
    cv2.imwrite(str(first / "grey.JPEG"), rng.integers(0, 256, (19, 7), dtype=np.uint8))
    (second / "trunc.JPEG").write_bytes(_jpeg_bytes(_image(rng, 0))[:120])
    (third / "empty.JPEG").write_bytes(b"")
    (third / "text.JPEG").write_text("not an image\n")
    (root / "train" / ".hidden").mkdir()  # hidden entries are ignored
    if val == "folders":
        for synset in SYNSETS:
            folder = root / "val" / synset
            folder.mkdir(parents=True)
            for i in range(2):
                cv2.imwrite(str(folder / f"v_{synset}_{i}.JPEG"), _image(rng, i + 3))
    else:
        folder = root / "val"
        folder.mkdir()
        for i in range(6):
            cv2.imwrite(str(folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG"), _image(rng, i))
    return root


BAD = {  # relative path -> words of the reason
    "train/n01443537/trunc.JPEG": "FF D9",
    "train/n01484850/empty.JPEG": "empty file",
    "train/n01484850/text.JPEG": "cannot decode",
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


def convert(src: Path, out: Path, **kwargs) -> imagenet.ConversionReport:
    kwargs.setdefault("max_bad_fraction", 0.5)
    return convert_imagenet(src, out, size=SIZE, **kwargs)


def leftovers(folder: Path) -> list[str]:
    """Temporary files (parts, writer temps) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- conversion


def test_convert_tree_by_folders(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "imagenet.h5"
    report = convert(tree, out)
    info = inspect_dataset(out)
    assert info.splits == {"train": 3 * 4 + 2, "validation": 6}
    assert report.splits == info.splits and report.files == 3 * 4 + 5 + 6
    assert info.sample_shape == (SIZE, SIZE, 3) and info.dtype == "uint8"
    assert info.num_classes == 3 and info.class_names == tuple(SYNSETS)
    assert str(tree.resolve()) in info.source and "INTER_AREA" in info.source
    assert sorted(os.listdir(out.parent)) == ["imagenet.h5", "imagenet.h5.manifest.json"]

    # Order: classes in order, files sorted by name; pixels as decode_image gives them.
    scanned = scan_image_tree(tree)
    for split in ("train", "validation"):
        shard = read_shard(out, split, 0, 1)
        assert shard.x.dtype == np.uint8 and shard.y.dtype == np.int64
        good = [(rel, label) for rel, label in scanned.splits[split] if rel not in BAD]
        assert shard.y.tolist() == [label for _, label in good]
        for x, (rel, _) in zip(shard.x, good, strict=True):
            np.testing.assert_array_equal(x, decode_image(tree / rel, SIZE)[0])

    train = read_shard(out, "train", 0, 1)
    names = [rel for rel, _ in scanned.splits["train"] if rel not in BAD]
    red = train.x[names.index("train/n01440764/a_red.JPEG")]
    assert (red == np.array([255, 0, 0], np.uint8)).all()  # BGR (0, 0, 255) is RGB red
    grey = train.x[names.index("train/n01440764/grey.JPEG")]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()

    manifest = read_manifest(out)
    assert manifest["format"] == "mpinewton-imagenet-manifest" and manifest["num_classes"] == 3
    assert [s["path"] for s in manifest["skipped"]] == sorted(BAD)
    for entry in manifest["skipped"]:
        assert BAD[entry["path"]] in entry["reason"] and entry["split"] == "train"
    assert manifest["converted"] == [{"split": "train", "path": "train/n01440764/a_red.JPEG",
                                      "note": "PNG content in a .JPEG file; decoded by content"}]
    assert manifest["splits"]["train"] == {"files": 17, "images": 14, "skipped": 3}
    assert [s["path"] for s in report.skipped] == sorted(BAD)
    with h5py.File(out, "r") as f:  # the same lists inside the file (root datasets, not splits)
        skipped = f["skipped"].asstr()[()].tolist()
        assert [row[1] for row in skipped] == sorted(BAD)
        assert list(f["skipped"].attrs["columns"]) == ["split", "path", "reason"]
        assert f["converted"].asstr()[()].tolist()[0][1] == "train/n01440764/a_red.JPEG"


def test_labels_file_and_csv(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "tree", val="flat")
    want = {1: "n01484850", 2: "n01440764", 3: "n01443537", 4: "n01440764", 5: "n01484850"}
    txt = tmp_path / "val.txt"  # file 6 is unlabelled: ignored, with a note
    txt.write_text("# file synset\n" + "".join(
        f"ILSVRC2012_val_{i:08d}.JPEG {s}\n" for i, s in sorted(want.items(), reverse=True)))
    csv = tmp_path / "LOC_val_solution.csv"  # ImageIds without extension, boxes after the synset
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i:08d},{s} 1 2 30 40 {s} 3 4 5 6\n" for i, s in want.items()))
    outs = []
    for labels in (txt, csv):
        out = tmp_path / labels.stem / "ds.h5"
        convert(src, out, val_labels=labels)
        shard = read_shard(out, "validation", 0, 1)
        assert shard.y.tolist() == [SYNSETS.index(want[i]) for i in sorted(want)]
        assert "not named in" in " ".join(read_manifest(out)["notes"])
        outs.append(shard.x)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(
        outs[0][0], decode_image(src / "val" / "ILSVRC2012_val_00000001.JPEG", SIZE)[0])


def test_class_root_layout_and_class_list(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "tree")
    shutil.rmtree(src / "val")
    classes = tmp_path / "classes.txt"  # LOC_synset_mapping.txt style: synset, then words
    classes.write_text("n01484850 goldfish, Carassius auratus\nn01440764 tench\n")
    out = tmp_path / "ds.h5"
    convert(src / "train", out, classes_file=classes)  # the root holds the class folders
    info = inspect_dataset(out)
    assert info.splits == {"train": 6 + 4} and info.class_names == ("n01484850", "n01440764")
    assert read_shard(out, "train", 0, 1).y.tolist() == [0] * 4 + [1] * 6
    assert "not in the class list" in read_manifest(out)["notes"][0]
    classes.write_text("n01440764\n\nn09999999\n")
    with pytest.raises(DataError, match=r"classes.txt, line 3: class 'n09999999' has no folder"):
        convert(src, tmp_path / "bad.h5", classes_file=classes)


# --------------------------------------------------------------------------- decoding rules


def test_decode_matches_opencv(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    cv2.imwrite(str(small), rng.integers(0, 256, (17, 29, 3), dtype=np.uint8))
    cv2.imwrite(str(big), rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    bgr = cv2.imread(str(small), cv2.IMREAD_COLOR)
    enlarged = cv2.resize(bgr, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(decode_image(small, SIZE)[0], enlarged[..., ::-1])
    bgr = cv2.imread(str(big), cv2.IMREAD_COLOR)
    shrunk = cv2.resize(bgr, (16, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(decode_image(big, 16)[0], shrunk[..., ::-1])
    # shorter side (width 40) to 20: 25 x 20, then the centre 20 x 20 rows [2, 22)
    shorter = cv2.resize(bgr, (20, 25), interpolation=cv2.INTER_AREA)[2:22]
    got, note = decode_image(big, 20, resize="shorter")
    np.testing.assert_array_equal(got, shorter[..., ::-1])
    assert got.shape == (20, 20, 3) and got.flags.c_contiguous and note is None


def test_truncated_jpeg_rule(tmp_path: Path) -> None:
    data = _jpeg_bytes(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    assert data.endswith(b"\xff\xd9")
    cut = tmp_path / "cut.JPEG"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with imagenet._quiet_opencv():
        assert cv2.imread(str(cut), cv2.IMREAD_COLOR) is not None  # OpenCV decodes it partially
        with pytest.raises(ImageReadError, match="truncated JPEG"):
            decode_image(cut, SIZE)  # ... but the missing FF D9 marks it bad
        assert decode_image(cut, SIZE, accept_truncated=True)[0].shape == (SIZE, SIZE, 3)
    padded = tmp_path / "padded.JPEG"  # zero padding after the marker is fine
    padded.write_bytes(data + b"\x00" * 100)
    assert decode_image(padded, SIZE)[0].shape == (SIZE, SIZE, 3)
    with pytest.raises(ImageReadError, match="cannot read the file"):
        decode_image(tmp_path / "missing.JPEG", SIZE)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    path = tmp_path / "cmyk.JPEG"
    image.new("CMYK", (11, 7), (0, 255, 255, 0)).save(path)  # red, in CMYK
    rgb, _ = decode_image(path, 8)
    assert rgb.shape == (8, 8, 3)
    assert (rgb[..., 0] > 240).all() and (rgb[..., 1:] < 15).all()


# --------------------------------------------------------------------------- errors


def test_too_many_bad_files(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds.h5"
    with pytest.raises(DataError) as err:
        convert_imagenet(tree, out, size=SIZE)  # default max_bad_fraction 0.01
    msg = str(err.value)
    assert "3 of 23 files" in msg and "--max-bad-fraction" in msg
    assert "trunc.JPEG" in msg and "empty.JPEG: empty file" in msg
    assert not out.exists() and not manifest_path(out).exists()
    assert leftovers(tmp_path) == []


def test_class_folder_without_readable_image(tree: Path, tmp_path: Path) -> None:
    folder = tree / "train" / "n01443537"
    for p in folder.iterdir():
        if p.name != "trunc.JPEG":
            p.unlink()
    out = tmp_path / "ds.h5"
    with pytest.raises(DataError, match=r"class folder .*n01443537 has no readable image"):
        convert(tree, out, max_bad_fraction=1.0)
    assert not out.exists() and leftovers(tmp_path) == []
    (folder / "trunc.JPEG").unlink()
    with pytest.raises(DataError, match=r"class folder .*n01443537 holds no files"):
        convert(tree, out)


def test_missing_or_empty_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"source folder .*nowhere does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "ds.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty holds no class folders"):
        convert(tmp_path / "empty", tmp_path / "ds.h5")
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(DataError, match=r"train holds no class folders"):
        convert(tmp_path / "empty", tmp_path / "ds.h5")
    assert not (tmp_path / "ds.h5").exists()


def test_labels_file_errors(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "tree", val="flat")
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n01440764\n\n"
                      "ILSVRC2012_val_00000002.JPEG n99999999\n")
    out = tmp_path / "ds.h5"
    with pytest.raises(DataError, match=r"labels.txt, line 3: unknown synset 'n99999999'"):
        convert(src, out, val_labels=labels)
    labels.write_text("ILSVRC2012_val_00000001.JPEG\n")
    with pytest.raises(DataError, match=r"labels.txt, line 1: expected"):
        convert(src, out, val_labels=labels)
    labels.write_text("ILSVRC2012_val_00000001.JPEG n01440764\nILSVRC2012_val_00000001 n01440764\n")
    with pytest.raises(DataError, match=r"line 2: .* already labelled on line 1"):
        convert(src, out, val_labels=labels)
    with pytest.raises(DataError, match=r"holds no image files; it holds class folders"):
        convert(make_tree(tmp_path / "t2"), out, val_labels=labels)
    assert not out.exists()


def test_options_and_existing_output(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds.h5"
    with pytest.raises(DataError, match="crop"):
        convert(tree, out, crop="center")  # only with resize="shorter"
    with pytest.raises(DataError, match="max_bad_fraction"):
        convert(tree, out, max_bad_fraction=1.5)
    convert(tree, out, resize="shorter", crop="center")
    with pytest.raises(DataError, match="exists; pass --force"):
        convert(tree, out)
    with pytest.raises(DataError, match="compression"):
        convert(tree, out, compression="lzf", force=True)
    convert(tree, out, force=True)
    plain = tmp_path / "plain.h5"
    convert(tree, plain, compression="none")
    with h5py.File(out, "r") as f, h5py.File(plain, "r") as g:
        assert f["train/x"].compression == "gzip" and g["train/x"].compression is None
        np.testing.assert_array_equal(f["train/x"][()], g["train/x"][()])
    assert read_manifest(plain)["options"]["compression"] == "none"


# --------------------------------------------------------------------------- CLI and MPI


def h5_content(path: Path) -> dict[str, object]:
    """Every attribute and dataset (values, dtype, chunks, filters) of an HDF5 file."""
    content: dict[str, object] = {}

    def attrs(obj: h5py.HLObject) -> dict[str, object]:
        return {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Dataset):
            value = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]
            content[name] = (value, str(obj.dtype), obj.chunks, obj.compression, attrs(obj))
        else:
            content[name] = attrs(obj)

    with h5py.File(path, "r") as f:
        content["/"] = attrs(f)
        f.visititems(visit)
    return content


def assert_same_dataset(a: Path, b: Path) -> None:
    ca, cb = h5_content(a), h5_content(b)
    assert list(ca) == list(cb)
    for key in ca:
        if isinstance(ca[key], tuple):
            np.testing.assert_array_equal(ca[key][0], cb[key][0], err_msg=key)
            assert ca[key][1:] == cb[key][1:], key
        else:
            assert ca[key] == cb[key], key
    assert manifest_path(a).read_bytes() == manifest_path(b).read_bytes()


def run_cli(ranks: int | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    cmd = [sys.executable, "-m", "mpinewton.data", "imagenet", *args]
    if ranks is not None:
        cmd = [MPIRUN, "--oversubscribe", "--allow-run-as-root", "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")
def test_mpirun_one_and_two_ranks_identical(tree: Path, tmp_path: Path) -> None:
    """Same arrays, attributes, tables and manifest for 1 process, mpirun -n 1 and -n 2,
    and byte-identical files (DatasetWriter stores no creation times)."""
    api = tmp_path / "api" / "ds.h5"
    convert(tree, api, max_bad_fraction=0.2)
    args = ["--src", str(tree), "--size", str(SIZE), "--max-bad-fraction", "0.2"]
    for ranks in (1, 2):
        out = tmp_path / f"n{ranks}" / "ds.h5"
        result = run_cli(ranks, *args, "--out", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"on {ranks} rank(s)" in result.stdout and "train 14, validation 6" in result.stdout
        assert result.stdout.count("wrote") == 1  # rank 0 alone reports
        assert_same_dataset(api, out)
        assert out.read_bytes() == api.read_bytes()
        assert leftovers(out.parent) == []


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")
def test_mpirun_error_reaches_every_rank(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds.h5"
    result = run_cli(2, "--src", str(tree), "--out", str(out), "--size", str(SIZE))
    assert result.returncode != 0
    assert result.stderr.count("error: imagenet: 3 of 23 files") == 1, result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_one_process(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds.h5"
    result = run_cli(None, "--src", str(tree / "nowhere"), "--out", str(out))
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = run_cli(None, "--src", str(tree), "--out", str(out), "--size", "8",
                     "--resize", "shorter", "--max-bad-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    assert "skipped 3 unreadable file(s)" in result.stdout
    # progress lines (mpinewton.progress) on stderr: files decoded, then images written
    assert "decode: 23/23 images (100%)" in result.stderr, result.stderr
    assert "write: 20/20 images (100%)" in result.stderr, result.stderr
    assert json.loads(manifest_path(out).read_text())["options"]["crop"] == "center"
    assert inspect_dataset(out).sample_shape == (8, 8, 3)
