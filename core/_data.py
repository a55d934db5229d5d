"""Datasets as device-ready tensors: IDX and CIFAR readers, scikit-learn digits, a registry."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .exceptions import DatasetNotFoundError, DuplicateNameError, UnknownNameError

__all__ = [
    "Dataset",
    "DatasetInfo",
    "dataset_info",
    "load_dataset",
    "list_datasets",
    "register_dataset",
    "read_idx",
    "write_idx",
    "split_train_val",
    "FASHION_MNIST_SYSTEM_DIR",
]

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test tensors of one dataset, ready to be moved to a device whole.

    ``task`` is ``"classification"`` (integer labels, ``n_classes`` set) or
    ``"regression"`` (float targets). ``input_shape`` is one example's shape before any
    flattening; ``x_*`` are flattened when the dataset was loaded with ``flatten=True``.
    Validation selects models; the test split is only reported.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str = "classification"
    n_classes: int | None = None
    input_shape: tuple[int, ...] = ()

    @property
    def in_dim(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    @property
    def in_features(self) -> int:
        """Features per time step for sequences ``x`` of shape (N, T, F); else ``in_dim``."""
        return int(self.x_train.shape[-1]) if self.x_train.dim() == 3 else self.in_dim

    @property
    def out_dim(self) -> int:
        """Classes, or outputs per prediction: per step when targets are (N, T, out)."""
        if self.task == "classification":
            return int(self.n_classes)  # type: ignore[arg-type]
        if self.y_train.dim() == 3:
            return int(self.y_train.shape[-1])
        return int(np.prod(self.y_train.shape[1:])) if self.y_train.dim() > 1 else 1

    def to(self, device: torch.device | str) -> Dataset:
        tensors = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **tensors)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test)}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset, known without loading it."""

    name: str
    input_shape: tuple[int, ...]
    task: str = "classification"
    n_classes: int | None = None
    out_dim: int | None = None

    @property
    def in_dim(self) -> int:
        return int(np.prod(self.input_shape))


Loader = Callable[..., Dataset]
_DATASETS: dict[str, Loader] = {}
_INFO: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str, info: DatasetInfo | None = None
) -> Callable[[Loader], Loader]:
    """Register ``loader(data_dir, subset_size, val_fraction, seed, flatten)`` under ``name``.

    ``info`` (shapes, task) lets budgets be checked without loading; without it
    :func:`dataset_info` loads the dataset once to find out.
    """

    def deco(fn: Loader) -> Loader:
        if name in _DATASETS:
            raise DuplicateNameError(f"dataset {name!r} is already registered")
        _DATASETS[name] = fn
        if info is not None:
            _INFO[name] = info
        return fn

    return deco


def dataset_info(name: str) -> DatasetInfo:
    """Shapes and task of a registered dataset (loads it only if it registered no info)."""
    if name not in _DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    if name not in _INFO:
        d = load_dataset(name, flatten=False)
        _INFO[name] = DatasetInfo(
            name=name,
            input_shape=tuple(d.x_train.shape[1:]),
            task=d.task,
            n_classes=d.n_classes,
            out_dim=d.out_dim,
        )
    return _INFO[name]


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    subset_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    flatten: bool = True,
    **kwargs: Any,
) -> Dataset:
    """Load a registered dataset as train/validation/test tensors.

    ``subset_size`` keeps that many training examples (before the validation split);
    ``val_fraction`` of the training pool becomes the validation split, chosen by ``seed``.
    """
    if name not in _DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    if subset_size is not None and (not isinstance(subset_size, int) or subset_size < 2):
        raise ValueError(f"subset_size must be an integer >= 2 or None, got {subset_size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    return _DATASETS[name](
        data_dir=Path(data_dir) if data_dir is not None else None,
        subset_size=subset_size,
        val_fraction=val_fraction,
        seed=seed,
        flatten=flatten,
        **kwargs,
    )


# -- helpers --------------------------------------------------------------------------------
def split_train_val(
    x: torch.Tensor, y: torch.Tensor, subset_size: int | None, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded subset and train/validation split of a training pool."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    if subset_size is not None:
        perm = perm[: min(subset_size, len(x))]
    n_val = max(1, int(round(len(perm) * val_fraction)))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


def _classification(
    name: str,
    x_pool: torch.Tensor,
    y_pool: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    subset_size: int | None,
    val_fraction: float,
    seed: int,
    flatten: bool,
    n_classes: int,
) -> Dataset:
    """Split, normalise with training statistics (per channel), and flatten if asked."""
    xtr, ytr, xva, yva = split_train_val(x_pool, y_pool, subset_size, val_fraction, seed)
    dims = [0] + list(range(2, xtr.dim()))
    mean = xtr.mean(dim=dims, keepdim=True)
    std = xtr.std(dim=dims, keepdim=True).clamp_min(1e-6)
    norm = [((t - mean) / std).contiguous() for t in (xtr, xva, x_test)]
    shape = tuple(xtr.shape[1:])
    if flatten:
        norm = [t.flatten(1) for t in norm]
    return Dataset(
        name=name,
        x_train=norm[0],
        y_train=ytr.long(),
        x_val=norm[1],
        y_val=yva.long(),
        x_test=norm[2],
        y_test=y_test.long(),
        task="classification",
        n_classes=n_classes,
        input_shape=shape,
    )


# -- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------------
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of the MNIST family."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but the file holds {data.size} values")
    return data.reshape(dims)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when the name ends in .gz."""
    path = Path(path)
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + a.tobytes())


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find_idx(dirs: list[Path]) -> dict[str, Path] | None:
    for d in dirs:
        found = {}
        for key, stem in _IDX_FILES.items():
            for cand in (d / f"{stem}.gz", d / stem):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == 4:
            return found
    return None


def _idx_dataset(
    name: str,
    dirs: list[Path],
    how_to_get: str,
    *,
    subset_size: int | None,
    val_fraction: float,
    seed: int,
    flatten: bool,
    download: Callable[[], Path] | None,
) -> Dataset:
    files = _find_idx(dirs)
    if files is None and download is not None:
        files = _find_idx([download()])
    if files is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DatasetNotFoundError(
            f"{name}: the four IDX files ({', '.join(s + '[.gz]' for s in _IDX_FILES.values())}) "
            f"were not found; looked in: {looked}. {how_to_get}"
        )
    arr = {k: read_idx(p) for k, p in files.items()}
    x_pool = torch.from_numpy(arr["x_train"].astype(np.float32) / 255.0).unsqueeze(1)
    x_test = torch.from_numpy(arr["x_test"].astype(np.float32) / 255.0).unsqueeze(1)
    return _classification(
        name,
        x_pool,
        torch.from_numpy(arr["y_train"].astype(np.int64)),
        x_test,
        torch.from_numpy(arr["y_test"].astype(np.int64)),
        subset_size=subset_size,
        val_fraction=val_fraction,
        seed=seed,
        flatten=flatten,
        n_classes=10,
    )


def _torchvision_download(cls_name: str, root: Path) -> Path:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    cls(str(root), train=True, download=True)
    cls(str(root), train=False, download=True)
    return root / cls_name / "raw"


@register_dataset("fashion-mnist", DatasetInfo("fashion-mnist", (1, 28, 28), n_classes=10))
def _fashion_mnist(
    *, data_dir: Path | None, download: bool = False, **kw: Any
) -> Dataset:
    dirs = []
    if data_dir is not None:
        dirs += [data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw"]
    dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return _idx_dataset(
        "fashion-mnist",
        dirs,
        "Install the Debian package (apt-get install dataset-fashion-mnist), copy the files "
        "into the data directory, or pass download=True (needs internet).",
        download=(lambda: _torchvision_download("FashionMNIST", data_dir or Path("data")))
        if download
        else None,
        **kw,
    )


@register_dataset("mnist", DatasetInfo("mnist", (1, 28, 28), n_classes=10))
def _mnist(*, data_dir: Path | None, download: bool = False, **kw: Any) -> Dataset:
    dirs = []
    if data_dir is not None:
        dirs += [data_dir, data_dir / "mnist", data_dir / "MNIST" / "raw"]
    dirs.append(Path("/usr/share/datasets/mnist"))
    return _idx_dataset(
        "mnist",
        dirs,
        "Copy the MNIST IDX files into the data directory or pass download=True (needs internet).",
        download=(lambda: _torchvision_download("MNIST", data_dir or Path("data")))
        if download
        else None,
        **kw,
    )


# -- CIFAR (the python pickle batches) ---------------------------------------------------------
def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(d[label_key], dtype=np.int64)


def _cifar(
    name: str,
    folder: str,
    train_files: list[str],
    test_file: str,
    label_key: bytes,
    n_classes: int,
    *,
    data_dir: Path | None,
    download: bool = False,
    **kw: Any,
) -> Dataset:
    roots = [data_dir / folder, data_dir] if data_dir is not None else []
    root = next((r for r in roots if all((r / f).is_file() for f in [*train_files, test_file])), None)
    if root is None and download:
        import torchvision

        base = data_dir or Path("data")
        cls = torchvision.datasets.CIFAR10 if n_classes == 10 else torchvision.datasets.CIFAR100
        cls(str(base), train=True, download=True)
        root = base / folder
    if root is None:
        raise DatasetNotFoundError(
            f"{name}: {folder}/ with {', '.join([*train_files, test_file])} was not found; looked "
            f"in: {', '.join(map(str, roots)) or '(no data_dir given)'}. Pass data_dir where the "
            f"extracted python version lives, or download=True (needs internet)."
        )
    parts = [_read_cifar_batch(root / f, label_key) for f in train_files]
    x_test, y_test = _read_cifar_batch(root / test_file, label_key)
    x_pool = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0)
    y_pool = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return _classification(
        name,
        x_pool,
        y_pool,
        torch.from_numpy(x_test.astype(np.float32) / 255.0),
        torch.from_numpy(y_test),
        n_classes=n_classes,
        **kw,
    )


@register_dataset("cifar10", DatasetInfo("cifar10", (3, 32, 32), n_classes=10))
def _cifar10(**kw: Any) -> Dataset:
    return _cifar(
        "cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch", b"labels", 10, **kw,
    )


@register_dataset("cifar100", DatasetInfo("cifar100", (3, 32, 32), n_classes=100))
def _cifar100(**kw: Any) -> Dataset:
    return _cifar("cifar100", "cifar-100-python", ["train"], "test", b"fine_labels", 100, **kw)


# -- scikit-learn digits: always offline ------------------------------------------------------
@register_dataset("digits", DatasetInfo("digits", (1, 8, 8), n_classes=10))
def _digits(*, data_dir: Path | None = None, test_fraction: float = 0.2, **kw: Any) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0).view(-1, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    # A fixed test split (seed 0) so that every run reports on the same held-out digits.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = int(round(len(x) * test_fraction))
    test, pool = perm[:n_test], perm[n_test:]
    return _classification(
        "digits", x[pool], y[pool], x[test], y[test], n_classes=10, **kw
    )
