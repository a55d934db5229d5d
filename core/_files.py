"""Users' datasets from files: ``npz:/path/data.npz`` arrays and ``folder:/path`` image folders.

**npz** (``numpy.savez``): four arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``.

- Inputs: vectors ``(N, D)``, grayscale images ``(N, H, W)`` or images ``(N, C, H, W)``,
  channels first as in PyTorch (channels-last ``(N, H, W, C)`` is refused with the
  ``transpose`` that fixes it). Any real numeric dtype; NaN and infinities are refused.
- Labels decide the task: an integer (or bool) dtype is classification, ``(N,)`` labels in
  ``0 .. n_classes - 1`` with ``n_classes = max + 1`` over both splits; a float dtype is
  regression, targets ``(N,)`` or ``(N, K)`` used as stored (objective ``val_loss``).
- A validation split is carved from the training arrays (``val_fraction``, ``seed``), as for
  every dataset; the test arrays are only reported.

**folder**: one sub-folder per class (class = label, in sorted order of the names), images
that Pillow reads (png, jpg, bmp, gif, tif, webp). With ``train/`` and ``test/`` sub-folders
those are the splits; otherwise a fixed fifth of each class (chosen with seed 0, whatever
the study's seed) is the test split. All images share one size (no resizing); they are
grayscale if every one is, RGB otherwise (alpha dropped).

Inputs are standardised with statistics of the training split (per channel for images, per
feature for vectors), reported in the files' own units as ``Dataset.normalization``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._data import (
    _SCHEMES,
    Dataset,
    DatasetInfo,
    _Scheme,
    split_train_val,
    standardise,
)
from .exceptions import DatasetNotFoundError

__all__: list[str] = []

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_FOLDER_TEST_FRACTION = 0.2


def _bad(name: str, message: str) -> ValueError:
    return ValueError(f"dataset {name!r}: {message}")


# -- npz ------------------------------------------------------------------------------------------
def _npz_headers(path: Path, name: str) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Shape and dtype of every array in the file, from the ``.npy`` headers alone."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"dataset {name!r}: no file {path}. An npz dataset is a file written by "
            f"numpy.savez holding {', '.join(NPZ_KEYS)}"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if major == 1
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                out[member[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise _bad(name, f"{path} is not a .npz file written by numpy.savez ({exc})") from None
    return out


def _check_npz(
    name: str, headers: dict[str, tuple[tuple[int, ...], np.dtype[Any]]]
) -> tuple[str, tuple[int, ...]]:
    """The task and one example's input shape (C, H, W) or (D,), or a ValueError that advises."""
    missing = [k for k in NPZ_KEYS if k not in headers]
    if missing:
        raise _bad(name, f"missing array{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                         f"the file holds {', '.join(sorted(headers)) or 'no arrays'}. Save it with "
                         f"numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    for key in NPZ_KEYS:
        shape, dtype = headers[key]
        if dtype.kind not in "biuf":
            raise _bad(name, f"{key} has dtype {dtype}, which is not numeric; inputs and labels "
                             f"must be integer or float arrays (no objects, strings or complex)")
        if not shape:
            raise _bad(name, f"{key} is a scalar; it must hold one row per example")
    (xtr, _), (ytr, ytr_dt) = headers["x_train"], headers["y_train"]
    (xte, _), (yte, yte_dt) = headers["x_test"], headers["y_test"]
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        if x[0] != y[0]:
            raise _bad(name, f"x_{split} has {x[0]} examples but y_{split} has {y[0]}; they must match")
    if xtr[1:] != xte[1:]:
        raise _bad(name, f"x_train examples have shape {xtr[1:]} but x_test examples {xte[1:]}; "
                         f"they must match")
    if xtr[0] < 2 or xte[0] < 1:
        raise _bad(name, f"needs at least 2 training and 1 test example; got {xtr[0]} and {xte[0]}")
    if len(xtr) == 1:
        raise _bad(name, f"x_train has shape {xtr}: one value per example; reshape it to "
                         f"(N, 1) vectors (x.reshape(-1, 1))")
    if len(xtr) > 4:
        raise _bad(name, f"x_train has shape {xtr}; allowed: vectors (N, D), grayscale images "
                         f"(N, H, W) or images (N, C, H, W)")
    if len(xtr) == 4 and xtr[1] > 4 and xtr[3] <= 4:
        raise _bad(name, f"x_train has shape {xtr}, which looks channels-last (N, H, W, C); "
                         f"images are channels-first (N, C, H, W): save x.transpose(0, 3, 1, 2)")
    classify = ytr_dt.kind in "biu"
    if classify != (yte_dt.kind in "biu"):
        raise _bad(name, f"y_train ({ytr_dt}) and y_test ({yte_dt}) must both be integer labels "
                         f"(classification) or both float targets (regression)")
    if classify and (len(ytr) != 1 or len(yte) != 1):
        raise _bad(name, f"integer labels mean classification and must be one class per example, "
                         f"shape (N,); got y_train {ytr} and y_test {yte}. For regression save "
                         f"float targets (y.astype(np.float32))")
    if not classify:
        if len(ytr) > 2:
            raise _bad(name, f"float targets mean regression and must be (N,) or (N, K); got {ytr}")
        if ytr[1:] != yte[1:]:
            raise _bad(name, f"y_train targets have shape {ytr[1:]} but y_test {yte[1:]}; they must match")
    shape = {2: (xtr[1],), 3: (1, *xtr[1:]), 4: tuple(xtr[1:])}[len(xtr)]
    return ("classification" if classify else "regression"), tuple(int(v) for v in shape)


def _n_classes(name: str, y_train: np.ndarray, y_test: np.ndarray) -> int:
    low = min(int(y_train.min()), int(y_test.min()))
    if low < 0:
        raise _bad(name, f"class labels must be 0 .. n_classes - 1; found {low}")
    n = max(int(y_train.max()), int(y_test.max())) + 1
    if n < 2:
        raise _bad(name, "classification needs at least 2 classes; every label is 0")
    return n


def _npz_info(path: Path) -> DatasetInfo:
    name = f"npz:{path}"
    task, shape = _check_npz(name, _npz_headers(path, name))
    if task == "regression":
        ytr_shape = _npz_headers(path, name)["y_train"][0]
        return DatasetInfo(name, shape, task="regression",
                           out_dim=int(ytr_shape[1]) if len(ytr_shape) == 2 else 1)
    with np.load(path, allow_pickle=False) as z:  # labels only: small
        n = _n_classes(name, z["y_train"], z["y_test"])
    return DatasetInfo(name, shape, task="classification", n_classes=n)


def _npz_load(
    path: Path, *, subset_size: int | None, val_fraction: float, seed: int, flatten: bool,
    data_dir: Path | None = None,
) -> Dataset:
    name = f"npz:{path}"
    task, shape = _check_npz(name, _npz_headers(path, name))
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in NPZ_KEYS}
    for key in ("x_train", "x_test") + (("y_train", "y_test") if task == "regression" else ()):
        if arrays[key].dtype.kind == "f" and not np.isfinite(arrays[key]).all():
            raise _bad(name, f"{key} holds NaN or infinite values; remove or replace them")
    x_pool, x_test = (torch.from_numpy(arrays[k].astype(np.float32)).reshape(-1, *shape)
                      for k in ("x_train", "x_test"))
    if task == "classification":
        n_classes: int | None = _n_classes(name, arrays["y_train"], arrays["y_test"])
        y_pool, y_test = (torch.from_numpy(arrays[k].astype(np.int64)) for k in ("y_train", "y_test"))
    else:
        n_classes = None
        y_pool, y_test = (torch.from_numpy(arrays[k].astype(np.float32)) for k in ("y_train", "y_test"))
    xtr, ytr, xva, yva = split_train_val(x_pool, y_pool, subset_size, val_fraction, seed)
    norm, stats = standardise(xtr, xva, x_test)
    if flatten:
        norm = [t.flatten(1) for t in norm]
    return Dataset(
        name=name, x_train=norm[0], y_train=ytr, x_val=norm[1], y_val=yva, x_test=norm[2],
        y_test=y_test, task=task, n_classes=n_classes, input_shape=shape, normalization=stats,
    )


def _npz_stamp(path: Path) -> object:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


# -- image folders --------------------------------------------------------------------------------
def _subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_layout(path: Path, name: str) -> tuple[list[str], dict[str, list[tuple[Path, int]]] | None,
                                                    list[tuple[Path, int]]]:
    """Class names, the train/test files if the folder splits them, else every file."""
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"dataset {name!r}: no folder {path}. An image-folder dataset is a folder with one "
            f"sub-folder of images per class (optionally inside train/ and test/)"
        )
    split = (path / "train").is_dir() and (path / "test").is_dir()
    root = path / "train" if split else path
    classes = [d.name for d in _subdirs(root)]
    if len(classes) < 2:
        raise _bad(name, f"{root} has {len(classes)} class sub-folder{'s' if len(classes) != 1 else ''}"
                         f"{' (' + classes[0] + ')' if classes else ''}; an image-folder dataset "
                         f"needs one sub-folder per class, at least 2")

    def files(base: Path, allowed: list[str]) -> list[tuple[Path, int]]:
        out = []
        for d in _subdirs(base):
            if d.name not in allowed:
                raise _bad(name, f"{d} is a class that {root} does not have; the classes are "
                                 f"{', '.join(allowed)}")
            imgs = _images(d)
            if not imgs and base is root:
                raise _bad(name, f"class folder {d} holds no images "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += [(p, allowed.index(d.name)) for p in imgs]
        return out

    if split:
        test = files(path / "test", classes)
        if not test:
            raise _bad(name, f"{path / 'test'} holds no images")
        return classes, {"train": files(root, classes), "test": test}, []
    return classes, None, files(root, classes)


def _open_image(p: Path, name: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(p)
    except (UnidentifiedImageError, OSError) as exc:
        raise _bad(name, f"cannot read image {p}: {exc}") from None


def _check_images(files: list[tuple[Path, int]], name: str) -> tuple[int, tuple[int, int]]:
    """Channels (1 if every image is grayscale, else 3) and the one (width, height)."""
    gray = True
    size: tuple[int, int] | None = None
    first: Path | None = None
    for p, _ in files:
        with _open_image(p, name) as im:
            if size is None:
                size, first = im.size, p
            elif im.size != size:
                raise _bad(name, f"image {p} is {im.size[0]}x{im.size[1]} but {first} is "
                                 f"{size[0]}x{size[1]}; all images must have one size (resize "
                                 f"them first, e.g. with PIL's Image.resize)")
            gray = gray and im.mode in ("1", "L", "LA", "I", "I;16", "F")
    assert size is not None
    return (1 if gray else 3), size


def _read_images(files: list[tuple[Path, int]], channels: int, name: str) -> Iterator[np.ndarray]:
    for p, _ in files:
        with _open_image(p, name) as im:
            a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        yield a[None] if channels == 1 else a.transpose(2, 0, 1)


def _folder_split(files: list[tuple[Path, int]], n_classes: int) -> tuple[list[int], list[int]]:
    """A fixed, stratified test split: the same files whatever the study's seed."""
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(n_classes):
        idx = [i for i, (_, y) in enumerate(files) if y == c]
        order = rng.permutation(len(idx))
        n_test = max(1, int(round(len(idx) * _FOLDER_TEST_FRACTION))) if len(idx) > 1 else 0
        test += [idx[i] for i in order[:n_test]]
        train += [idx[i] for i in order[n_test:]]
    return sorted(train), sorted(test)


def _folder_files(path: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    name = f"folder:{path}"
    classes, split, every = _folder_layout(path, name)
    if split is not None:
        return classes, split["train"], split["test"]
    tr, te = _folder_split(every, len(classes))
    if not te:
        raise _bad(name, "too few images to set a test split aside; give each class at least 2, "
                         "or use train/ and test/ sub-folders")
    return classes, [every[i] for i in tr], [every[i] for i in te]


def _folder_info(path: Path) -> DatasetInfo:
    name = f"folder:{path}"
    classes, train, test = _folder_files(path)
    channels, (w, h) = _check_images(train + test, name)
    return DatasetInfo(name, (channels, h, w), task="classification", n_classes=len(classes))


def _folder_load(
    path: Path, *, subset_size: int | None, val_fraction: float, seed: int, flatten: bool,
    data_dir: Path | None = None,
) -> Dataset:
    name = f"folder:{path}"
    classes, train, test = _folder_files(path)
    if len(train) < 2:
        raise _bad(name, f"needs at least 2 training images; found {len(train)}")
    channels, _ = _check_images(train + test, name)

    def stack(files: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.stack(list(_read_images(files, channels, name))).astype(np.float32) / 255.0
        return torch.from_numpy(x), torch.tensor([y for _, y in files], dtype=torch.int64)

    (x_pool, y_pool), (x_test, y_test) = stack(train), stack(test)
    xtr, ytr, xva, yva = split_train_val(x_pool, y_pool, subset_size, val_fraction, seed)
    norm, stats = standardise(xtr, xva, x_test, raw_scale=1 / 255)
    shape = tuple(xtr.shape[1:])
    if flatten:
        norm = [t.flatten(1) for t in norm]
    return Dataset(
        name=name, x_train=norm[0], y_train=ytr, x_val=norm[1], y_val=yva, x_test=norm[2],
        y_test=y_test, task="classification", n_classes=len(classes), input_shape=shape,
        normalization=stats, classes=tuple(classes),
    )


def _folder_stamp(path: Path) -> object:
    """Modification times of the folder and its sub-folders: they change as files come and go."""
    stamp = []
    try:
        for root, dirs, _ in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            stamp.append((root, os.stat(root).st_mtime_ns))
            if len(stamp) > 10_000:  # a deep tree: stop looking, the first entries decide
                break
    except OSError:
        return None
    return tuple(stamp)


_SCHEMES["npz"] = _Scheme(_npz_load, _npz_info, _npz_stamp, "npz:/path/file.npz")
_SCHEMES["folder"] = _Scheme(_folder_load, _folder_info, _folder_stamp, "folder:/path/to/images")
