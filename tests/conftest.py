import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import vimerge

# Two threads everywhere, as on the development machine and CI; deterministic seeds per test.
torch.set_num_threads(int(os.environ.get("VIMERGE_TEST_THREADS", "2")))

TINY_VIM = dict(depth=6, img_size=32, patch_size=4, stride=4, embed_dim=32, num_classes=5)
"""The shared tiny Vim: 8x8 grid of 4x4 patches (65 tokens), 6 blocks, width 32, 5 classes."""


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    """Factory of the shared tiny Vim (``TINY_VIM``, any field overridable), in eval mode."""
    def make(name: str = "vim_tiny", **overrides):
        return vimerge.create_model(name, **{**TINY_VIM, **overrides}).eval()
    return make


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models on a shared 2-core machine: a second
    thread only adds synchronisation; runs compared in a test must use the same count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def easy_data(n: int = 96, seed: int = 0):
    """3 classes of 16x16 grey images: a bright horizontal band at a class-specific height."""
    from torch.utils.data import TensorDataset
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
    for k in range(3):
        x[y == k, :, 5 * k:5 * k + 5, :] += 1.5
    return TensorDataset(x, y)


def write_fashion_idx(root: Path, count: int, seed: int = 7, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """Write a random Fashion-MNIST split of ``count`` images as gzip IDX files (the Debian
    package's layout) into ``root``; returns (images (count, 28, 28) uint8, labels (count,))."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    for name, array in ((f"{split}-images-idx3-ubyte.gz", images), (f"{split}-labels-idx1-ubyte.gz", labels)):
        raw = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        (root / name).write_bytes(gzip.compress(raw + array.tobytes()))
    return images, labels
