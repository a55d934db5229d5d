"""Datasets as device-ready tensors: IDX and CIFAR readers, scikit-learn digits, a registry.

Besides registered names, a dataset name may point at a file: ``npz:/path/data.npz`` or
``folder:/path/images`` (see ``core/_files.py``). Every loader standardises inputs with
statistics fitted on the training split only and hands them over as
``Dataset.normalization``, which :func:`normalize` applies to raw inputs later.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import time
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
    "resolve_dataset_name",
    "normalize",
    "standardise",
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

    ``normalization`` holds the statistics the inputs were standardised with, fitted on the
    training split only and expressed in the units of the raw data (the file's pixel values,
    say): ``{"mean": [...], "std": [...], "shape": [...], "input_shape": [...]}``, where
    ``mean`` and ``std`` are flat lists to be reshaped to ``shape``, which broadcasts against
    one example of ``input_shape`` (per channel ``(C, 1, 1)``, per feature ``(D,)``). It is
    ``None`` when the inputs were used as generated. :func:`normalize` applies it. ``classes``
    names the classes by label where the data named them (image folders).
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
    normalization: dict[str, Any] | None = None
    classes: tuple[str, ...] = ()

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


@dataclass(frozen=True)
class _Scheme:
    """A family of datasets named ``scheme:path`` (``npz:``, ``folder:``), filled in by ``_files``."""

    load: Callable[..., Dataset]  # load(path, subset_size=, val_fraction=, seed=, flatten=, **kw)
    info: Callable[[Path], DatasetInfo]  # shapes and task, reading as little as it can
    stamp: Callable[[Path], object]  # changes when the data on disk changes
    describe: str


_SCHEMES: dict[str, _Scheme] = {}
_FILE_INFO: dict[str, tuple[object, DatasetInfo, float]] = {}
_RECHECK_SECONDS = 1.0  # a budget check asks for the info many times in a row


def _split_scheme(name: str) -> tuple[_Scheme, Path] | None:
    scheme, sep, rest = name.partition(":")
    if not sep or scheme not in _SCHEMES:
        return None
    if not rest.strip():
        raise ValueError(f"dataset {name!r} names no path; write {_SCHEMES[scheme].describe}")
    return _SCHEMES[scheme], Path(os.path.expanduser(rest))


def _unknown(name: str) -> UnknownNameError:
    forms = ", ".join(s.describe for s in _SCHEMES.values())
    return UnknownNameError(
        f"unknown dataset {name!r}; known: {', '.join(list_datasets())}"
        + (f"; or a file dataset: {forms}" if forms else "")
    )


def resolve_dataset_name(name: str) -> str:
    """``name`` checked and in the form a study stores: a file dataset's path made absolute.

    A registered name comes back as it is. ``npz:``/``folder:`` names are checked on disk
    (the file exists and holds a dataset; its shapes are read) and their relative paths
    resolved against the current directory, so that every process reading the stored name
    finds the same file. Raises :class:`UnknownNameError` (listing the known names),
    :class:`DatasetNotFoundError` or ``ValueError`` with what is wrong and what is allowed.
    """
    if name in _DATASETS:
        return name
    found = _split_scheme(name)
    if found is None:
        raise _unknown(name)
    scheme = name.partition(":")[0]
    canonical = f"{scheme}:{found[1].absolute()}"
    dataset_info(canonical)
    return canonical


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
    """Shapes and task of a dataset (loads it only if it registered no info).

    For ``npz:``/``folder:`` datasets only headers and labels are read, once per version of
    the data on disk.
    """
    if name not in _DATASETS:
        found = _split_scheme(name)
        if found is None:
            raise _unknown(name)
        scheme, path = found
        now = time.monotonic()
        cached = _FILE_INFO.get(name)
        if cached is not None and now - cached[2] < _RECHECK_SECONDS:
            return cached[1]
        stamp = scheme.stamp(path)
        if cached is None or cached[0] != stamp or stamp is None:
            info = replace(scheme.info(path), name=name)
        else:
            info = cached[1]
        _FILE_INFO[name] = (stamp, info, now)
        return info
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
    ``name`` is a registered name or a file dataset, ``npz:/path/data.npz`` or
    ``folder:/path/images`` (see :mod:`core._files` for the formats).
    """
    found = None
    if name not in _DATASETS:
        found = _split_scheme(name)
        if found is None:
            raise _unknown(name)
    if subset_size is not None and (not isinstance(subset_size, int) or subset_size < 2):
        raise ValueError(f"subset_size must be an integer >= 2 or None, got {subset_size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if found is not None:
        scheme, path = found
        data = scheme.load(path, subset_size=subset_size, val_fraction=val_fraction, seed=seed,
                           flatten=flatten, **kwargs)
        return replace(data, name=name)
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


def standardise(
    x_train: torch.Tensor, *others: torch.Tensor, raw_scale: float = 1.0
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Standardise with statistics of ``x_train`` alone; the tensors and those statistics.

    Per channel for images ``(N, C, H, W)`` (over N, H, W), per feature for vectors
    ``(N, D)`` and sequences ``(N, T, F)``. A feature that is constant in training keeps a
    scale of 1 rather than blowing up what differs from it later. ``raw_scale`` is the factor
    the loader applied to the raw values before (``1/255`` for pixels read as bytes): the
    statistics are reported in raw units, so :func:`normalize` takes the raw data.
    """
    if x_train.dim() == 4:
        dims: list[int] = [0, 2, 3]
    elif x_train.dim() == 3:
        dims = [0, 1]
    else:
        dims = [0]
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, keepdim=True) if len(x_train) > 1 else torch.ones_like(mean)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    out = [((t - mean) / std).contiguous() for t in (x_train, *others)]
    shape = list(mean.shape[1:])
    stats = {
        "mean": [float(v) / raw_scale for v in mean.flatten().tolist()],
        "std": [float(v) / raw_scale for v in std.flatten().tolist()],
        "shape": shape,
        "input_shape": list(x_train.shape[1:]),
    }
    return out, stats


def normalize(x: Any, stats: dict[str, Any] | None) -> torch.Tensor:
    """Apply a dataset's stored ``normalization`` to raw inputs, as its loader did.

    ``x`` is raw data in the units of the original files (uint8 pixels, the ``.npz``
    arrays' values), a NumPy array or a tensor, batched: ``(N, *input_shape)`` or any
    shape with as many values per example (``(N, H, W)`` grayscale images, flattened
    ``(N, D)``). The result is float32 in the shape given: flatten it (``.flatten(1)``) for
    a ``flat`` family, or reshape to ``(N, *input_shape)`` for an image family. With
    ``stats=None`` (data used as generated) only the dtype changes. ``stats`` is
    ``Dataset.normalization``, or ``checkpoint["config"]["normalization"]`` of a kept model::

        ckpt = torch.load("trial7.pt")
        model = core.create_model(ckpt["config"]["family"], **ckpt["config"]["model_args"])
        model.load_state_dict(ckpt["state_dict"])
        logits = model(core.normalize(raw, ckpt["config"]["normalization"]).flatten(1))
    """
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float32)
    if stats is None:
        return t
    input_shape = tuple(int(v) for v in stats["input_shape"])
    per_example = math.prod(input_shape)
    single = tuple(t.shape) == input_shape
    if t.dim() == 0 or (not single and t[0].numel() != per_example):
        raise ValueError(
            f"normalize: inputs of shape {tuple(t.shape)} do not hold examples of shape "
            f"{input_shape} ({per_example} values each); pass a batch (N, *{input_shape})"
        )
    mean = torch.tensor(stats["mean"], dtype=torch.float32, device=t.device).reshape(stats["shape"])
    std = torch.tensor(stats["std"], dtype=torch.float32, device=t.device).reshape(stats["shape"])
    batched = t.reshape(-1, *input_shape)
    return ((batched - mean) / std).reshape(t.shape)


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
    raw_scale: float = 1.0,
) -> Dataset:
    """Split, normalise with training statistics (per channel), and flatten if asked."""
    xtr, ytr, xva, yva = split_train_val(x_pool, y_pool, subset_size, val_fraction, seed)
    norm, stats = standardise(xtr, xva, x_test, raw_scale=raw_scale)
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
        normalization=stats,
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
        raw_scale=1 / 255,
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
        raw_scale=1 / 255,
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
        "digits", x[pool], y[pool], x[test], y[test], n_classes=10, raw_scale=1 / 16, **kw
    )
