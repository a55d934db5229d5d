"""Datasets: the IDX reader on generated files, loaders, splits, and clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from core import (
    FASHION_MNIST_SYSTEM_DIR,
    DatasetNotFoundError,
    UnknownNameError,
    dataset_info,
    load_dataset,
    normalize,
    read_idx,
    write_idx,
)


def _write_fake_mnist(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(root / f"train-labels-idx1-ubyte{ext}", rng.integers(0, 10, n_train))
    write_idx(root / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(root / f"t10k-labels-idx1-ubyte{ext}", rng.integers(0, 10, n_test))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, a)
    assert np.array_equal(read_idx(p), a)


def test_idx_reader_rejects_garbage(tmp_path: Path) -> None:
    p = tmp_path / "bad.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(p)
    q = tmp_path / "short"
    q.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ValueError, match="header says"):
        read_idx(q)


def test_fashion_mnist_from_data_dir(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path)
    d = load_dataset("fashion-mnist", data_dir=tmp_path, val_fraction=0.25)
    assert d.sizes() == {"train": 45, "val": 15, "test": 20}
    assert d.x_train.shape == (45, 784) and d.y_train.dtype == torch.long
    assert d.input_shape == (1, 28, 28) and d.n_classes == 10
    # normalised with training statistics
    assert abs(float(d.x_train.mean())) < 1e-4
    img = load_dataset("fashion-mnist", data_dir=tmp_path, flatten=False)
    assert img.x_train.shape[1:] == (1, 28, 28)


def test_mnist_reads_uncompressed_files(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path / "mnist", gz=False)
    d = load_dataset("mnist", data_dir=tmp_path)
    assert d.sizes()["test"] == 20


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(err.value) and "download" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="digits"):
        load_dataset("imagenet")


def test_digits_splits_are_seeded_and_disjoint() -> None:
    a = load_dataset("digits", seed=1)
    b = load_dataset("digits", seed=1)
    c = load_dataset("digits", seed=2)
    assert torch.equal(a.x_val, b.x_val)
    assert not torch.equal(a.x_val, c.x_val)
    assert torch.equal(a.y_test, c.y_test)  # the test split is fixed
    assert sum(a.sizes().values()) == 1797
    small = load_dataset("digits", subset_size=100, val_fraction=0.2)
    assert small.sizes()["train"] == 80 and small.sizes()["val"] == 20


def test_dataset_info_is_known_without_loading() -> None:
    info = dataset_info("fashion-mnist")
    assert info.in_dim == 784 and info.n_classes == 10


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(),
                    reason="real Fashion-MNIST needs the Debian package dataset-fashion-mnist")
def test_real_fashion_mnist_loads() -> None:
    d = load_dataset("fashion-mnist", subset_size=1000)
    assert d.sizes()["test"] == 10_000
    assert set(d.y_test.unique().tolist()) == set(range(10))


def test_idx_statistics_come_from_the_training_split_in_pixel_units(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path)
    d = load_dataset("fashion-mnist", data_dir=tmp_path, val_fraction=0.25, flatten=False)
    stats = d.normalization
    assert stats is not None and stats["input_shape"] == [1, 28, 28] and stats["shape"] == [1, 1, 1]
    # the training split's pixels, recovered in the 0..255 units of the files
    pixels = d.x_train * stats["std"][0] + stats["mean"][0]
    assert abs(float(pixels.mean()) - stats["mean"][0]) < 1e-2 and 100 < stats["mean"][0] < 155
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")  # uint8, (N, 28, 28)
    assert torch.allclose(normalize(raw, stats), d.x_test.squeeze(1), atol=1e-4)
