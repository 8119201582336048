"""vimerge.data: evaluation transforms, ImageFolder, Fashion-MNIST IDX files."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vimerge.data import (
    DatasetError,
    EvalTransform,
    FashionMNIST,
    FashionMNISTNotFound,
    ImageFolder,
    Skipped,
    center_crop,
    detect_kind,
    load_split,
    make_loader,
    normalize,
    open_dataset,
    read_idx,
    resize_shorter,
    split_dir,
    to_tensor,
)
from vimerge.data.fashion_mnist import DEFAULT_ROOT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _expected(rgb, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return [(v / 255 - m) / s for v, m, s in zip(rgb, mean, std)]


# --------------------------------------------------------------------------- transforms


def test_resize_size_follows_crop_pct():
    assert EvalTransform(224).resize_size == (256, 256)
    assert EvalTransform(28).resize_size == (32, 32)
    assert EvalTransform(224, crop_pct=1.0).resize_size == (224, 224)
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform(224, crop_pct=0.0)


def test_two_colour_image_crop_and_normalisation_exact():
    # 40 x 32 (w x h); shorter side 32 = int(28 / 0.875): no resampling, so values stay exact.
    red, blue = (255, 0, 0), (0, 0, 255)
    img = Image.new("RGB", (40, 32), blue)
    img.paste(Image.new("RGB", (20, 32), red), (0, 0))    # columns 0..19 red, 20..39 blue
    x = EvalTransform(28)(img)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    # centre crop: left = round((40 - 28) / 2) = 6, top = 2 -> columns 6..19 red, 20..33 blue
    for c in range(3):
        torch.testing.assert_close(x[c, :, :14], torch.full((28, 14), _expected(red)[c]), rtol=0, atol=1e-6)
        torch.testing.assert_close(x[c, :, 14:], torch.full((28, 14), _expected(blue)[c]), rtol=0, atol=1e-6)


def test_resize_then_crop_keeps_the_central_region():
    # 128 x 64 -> shorter side to 32: 64 x 32 (halved); crop 28 x 28 at left 18, top 2.
    img = Image.new("RGB", (128, 64), (255, 255, 255))
    img.paste(Image.new("RGB", (64, 64), (0, 0, 0)), (0, 0))   # left half black
    t = EvalTransform(28, mean=(0.0,), std=(1.0,))
    small = t.resize_and_crop(img)
    assert small.size == (28, 28)
    x = t(img)
    # resized column 32 is the edge, i.e. crop column 14; bicubic reaches 2 output pixels
    assert torch.all(x[:, :, :12] == 0.0)
    assert torch.all(x[:, :, 17:] == 1.0)


def test_uniform_image_survives_bicubic_resize_exactly():
    colour = (10, 200, 90)
    x = EvalTransform(28)(Image.new("RGB", (64, 48), colour))
    for c in range(3):
        torch.testing.assert_close(x[c], torch.full((28, 28), _expected(colour)[c]), rtol=0, atol=1e-6)


def test_grey_model_gets_luminance():
    # pillow: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 -> 76 for pure red
    x = EvalTransform(28, channels=1, mean=(0.5,), std=(0.25,))(Image.new("RGB", (32, 32), (255, 0, 0)))
    assert x.shape == (1, 28, 28)
    torch.testing.assert_close(x, torch.full((1, 28, 28), (76 / 255 - 0.5) / 0.25), rtol=0, atol=1e-6)


def test_helpers():
    img = Image.new("RGB", (10, 20))
    assert resize_shorter(img, 5).size == (5, 10)
    assert resize_shorter(Image.new("RGB", (30, 20)), 10).size == (15, 10)
    assert center_crop(Image.new("L", (4, 4)), 6).size == (6, 6)    # padded when too small
    t = to_tensor(Image.new("L", (3, 2), 51))
    assert t.shape == (1, 2, 3) and torch.all(t == 0.2)
    y = normalize(torch.ones(3, 1, 1), (0.5,), (0.5,))
    assert torch.all(y == 1.0)
    with pytest.raises(ValueError, match="mean has 2 values"):
        normalize(torch.ones(3, 1, 1), (0.5, 0.5), (1.0,))


# --------------------------------------------------------------------------- ImageFolder


def _png(path: Path, colour=(0, 0, 0), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_imagefolder_classes_sorted_and_labelled(tmp_path):
    _png(tmp_path / "b_cat" / "1.png")
    _png(tmp_path / "b_cat" / "sub" / "2.PNG")       # nested, upper-case extension
    _png(tmp_path / "a_dog" / "x.jpeg")
    _png(tmp_path / "c_eel" / "y.bmp")
    (tmp_path / "c_eel" / "notes.txt").write_text("not an image")
    _png(tmp_path / "c_eel" / ".hidden.png")
    _png(tmp_path / ".cache" / "z.png")
    ds = ImageFolder(tmp_path, EvalTransform(8, crop_pct=1.0))
    assert ds.classes == ["a_dog", "b_cat", "c_eel"]
    assert ds.class_to_idx == {"a_dog": 0, "b_cat": 1, "c_eel": 2}
    assert [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in ds.samples] == [
        ("a_dog/x.jpeg", 0), ("b_cat/1.png", 1), ("b_cat/sub/2.PNG", 1), ("c_eel/y.bmp", 2)]
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and y == 1


def test_imagefolder_limit_spreads_over_classes(tmp_path):
    for c in "abc":
        for i in range(4):
            _png(tmp_path / c / f"{i}.png")
    ds = ImageFolder(tmp_path, limit=3)
    assert len(ds) == 3 and ds.targets == [0, 1, 2]


def test_corrupt_images_are_skipped_and_named(tmp_path):
    _png(tmp_path / "a" / "good.png", (10, 20, 30))
    good = _png(tmp_path / "b" / "good2.png", (40, 50, 60))
    data = good.read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "b" / "text.jpg").write_text("this is not a JPEG\n")
    ds = ImageFolder(tmp_path, EvalTransform(8, crop_pct=1.0))
    assert len(ds) == 4
    results = [ds[i] for i in range(len(ds))]
    bad = sorted(Path(r.path).name for r in results if isinstance(r, Skipped))
    assert bad == ["text.jpg", "truncated.png"]
    assert sorted(Path(p).name for p in ds.skipped) == bad
    batches = list(make_loader(ds, batch_size=3))
    assert sum(len(b.labels) for b in batches) == 2
    assert sorted(Path(s.path).name for b in batches for s in b.skipped) == bad
    assert all(s.reason for b in batches for s in b.skipped)


def test_whole_batch_unreadable(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_text("nope")
    batch = next(iter(make_loader(ImageFolder(tmp_path, EvalTransform(8)), batch_size=4)))
    assert batch.images is None and len(batch.labels) == 0 and len(batch.skipped) == 1


@pytest.mark.parametrize("case", ["missing", "empty", "files-only", "no-images", "a-file"])
def test_imagefolder_layout_errors(tmp_path, case):
    root = tmp_path / "val"
    if case == "empty":
        root.mkdir()
    elif case == "files-only":
        _png(root / "img.png")
    elif case == "no-images":
        (root / "n01440764").mkdir(parents=True)
        (root / "n01440764" / "readme.txt").write_text("x")
    elif case == "a-file":
        root.write_text("x")
    with pytest.raises(DatasetError) as info:
        ImageFolder(root)
    message = str(info.value)
    assert str(root) in message and "one sub-folder per class" in message


# --------------------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = False) -> Path:
    """An IDX file written by hand (independent of the reader)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def make_fashion(root: Path, n: int = 12, split: str = "t10k", compress: bool = False, seed: int = 0,
                 dotted: bool = False):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    sep = "." if dotted else "-"
    suffix = ".gz" if compress else ""
    write_idx(root / f"{split}-images{sep}idx3-ubyte{suffix}", images, compress=compress)
    write_idx(root / f"{split}-labels{sep}idx1-ubyte{suffix}", labels, compress=compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    images, labels = make_fashion(tmp_path, n=7, compress=compress)
    got_images, got_labels = load_split(tmp_path, "test")
    assert got_images.dtype == np.uint8 and np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and np.array_equal(got_labels, labels)
    ds = FashionMNIST(tmp_path, "test")
    assert len(ds) == 7 and len(ds.classes) == 10 and ds.classes[9] == "Ankle boot"
    for i in range(7):
        x, y = ds[i]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == int(labels[i])
        expected = (images[i].astype(np.float64) / 255 - 0.2860) / 0.3530
        np.testing.assert_allclose(x[0].numpy(), expected, rtol=0, atol=1e-5)


def test_train_split_dotted_names_limit_and_resize(tmp_path):
    _, labels = make_fashion(tmp_path, n=9, split="train", dotted=True)
    ds = FashionMNIST(tmp_path, "train", limit=4, img_size=56, channels=3)
    assert len(ds) == 4 and ds.targets.tolist() == labels[:4].tolist()
    x, _ = ds[0]
    assert x.shape == (3, 56, 56) and torch.equal(x[0], x[2])
    with pytest.raises(FashionMNISTNotFound, match="t10k-images-idx3-ubyte"):
        FashionMNIST(tmp_path, "test")
    assert detect_kind(tmp_path, "train") == "fashion-mnist"


def test_open_dataset_auto(tmp_path):
    make_fashion(tmp_path / "fm", n=3)
    _png(tmp_path / "folder" / "cls" / "a.png")
    assert isinstance(open_dataset(tmp_path / "fm", img_size=28, channels=1), FashionMNIST)
    assert isinstance(open_dataset(tmp_path / "folder", img_size=8, channels=3), ImageFolder)


def test_bad_magic_is_a_clear_error(tmp_path):
    make_fashion(tmp_path, n=3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)), magic=2049)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte has the magic number 2049.*expected 2051"):
        load_split(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(10))
    with pytest.raises(DatasetError, match="magic number"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte")


def test_truncated_and_corrupt_files(tmp_path):
    make_fashion(tmp_path, n=3)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_split(tmp_path)
    make_fashion(tmp_path / "gz", n=3, compress=True)
    gz = tmp_path / "gz" / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:12])
    with pytest.raises(DatasetError, match="gzip"):
        load_split(tmp_path / "gz")
    make_fashion(tmp_path / "count", n=3)
    write_idx(tmp_path / "count" / "t10k-labels-idx1-ubyte", np.zeros(2))
    with pytest.raises(DatasetError, match="3 images but"):
        load_split(tmp_path / "count")


def test_missing_dataset_gives_the_fix(tmp_path):
    with pytest.raises(FashionMNISTNotFound) as info:
        FashionMNIST(tmp_path / "nowhere")
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message and "--data DIR" in message
    assert "\n" not in message


@pytest.mark.skipif(not Path(DEFAULT_ROOT, "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_installed_package_labels():
    from vimerge.data.fashion_mnist import LABELS_MAGIC, find_file
    labels = read_idx(find_file(DEFAULT_ROOT, "t10k-labels-idx1-ubyte"), magic=LABELS_MAGIC)
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------- dataset roots


def test_split_dir_one_rule_for_a_dataset_root(tmp_path):
    # a root holding train/ and val/: the splits, never two classes named "train" and "val"
    root = tmp_path / "ds"
    for split in ("train", "val"):
        _png(root / split / "cat" / "0.png")
    assert split_dir(root, "train") == root / "train"
    assert split_dir(root, "val") == root / "val"
    assert split_dir(str(root), "test") == root / "val"           # a test split read from val/
    # other spellings of the validation split
    alt = tmp_path / "alt"
    _png(alt / "training" / "cat" / "0.png")
    _png(alt / "validation" / "cat" / "0.png")
    assert (split_dir(alt, "train"), split_dir(alt, "val")) == (alt / "training", alt / "validation")
    # a root without split folders is one split: its sub-folders are the classes
    flat = tmp_path / "flat"
    _png(flat / "cat" / "0.png")
    assert split_dir(flat, "val") == flat == split_dir(flat, "train")
    # split folders without the one asked for: an error naming what is there, or None
    only = tmp_path / "only"
    _png(only / "train" / "cat" / "0.png")
    with pytest.raises(DatasetError, match="train"):
        split_dir(only, "val")
    assert split_dir(only, "val", required=False) is None
