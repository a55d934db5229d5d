"""The single-model trainer: whole dataset on the device, index shuffling, per-epoch metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from ._data import Dataset, load_dataset
from ._dendritic_conv import DendriticConv2d
from ._layers import DendriticLayer
from ._registry import count_parameters

__all__ = [
    "TrainResult",
    "StepHook",
    "train_model",
    "compare_models",
    "evaluate",
    "resolve_device",
    "make_optimizer",
    "lr_multiplier",
    "schedule_steps",
    "shift_images",
    "LR_SCHEDULES",
    "AUGMENTS",
    "MAX_SHIFT",
]

OnEpoch = Callable[[int, dict[str, Any]], Any]

#: learning-rate schedules of :func:`train_model` (see :func:`lr_multiplier`)
LR_SCHEDULES = ("constant", "cosine", "onecycle")
#: data augmentations of :func:`train_model`
AUGMENTS = ("none", "shift")
#: "shift" moves each image by up to this many pixels along each axis
MAX_SHIFT = 2
# onecycle starts (and its warm-up begins) at lr / _ONECYCLE_DIV and ends at lr * _ONECYCLE_END
_ONECYCLE_DIV = 25.0
_ONECYCLE_END = 1e-4 / _ONECYCLE_DIV
_ONECYCLE_WARMUP = 0.3  # onecycle's warm-up, as a fraction of training, unless one is given


def lr_multiplier(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """The factor on the base learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    During the first ``warmup_steps`` steps the factor rises linearly and reaches 1 on the
    last of them (``constant`` and ``cosine`` from 0, ``onecycle`` from 1/25). After it,
    ``constant`` stays at 1, ``cosine`` follows half a cosine from 1 towards 0 over the
    remaining steps, and ``onecycle`` the same half cosine from 1 down to 4e-6.
    Population trainers call this too, so that both paths train on the same schedule.
    """
    if step < warmup_steps:
        ramp = (step + 1) / warmup_steps
        return ramp if schedule != "onecycle" else 1 / _ONECYCLE_DIV + (1 - 1 / _ONECYCLE_DIV) * ramp
    if schedule == "constant":
        return 1.0
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return cos if schedule == "cosine" else _ONECYCLE_END + (1 - _ONECYCLE_END) * cos


def schedule_steps(
    n_train: int, batch_size: int, n_epochs: int, lr_schedule: str, warmup_epochs: float | None
) -> tuple[int, int]:
    """``(total_steps, warmup_steps)`` of a run, as :func:`train_model` passes them to :func:`lr_multiplier`."""
    steps_per_epoch = math.ceil(n_train / batch_size)
    warmup = warmup_epochs if warmup_epochs is not None else (
        _ONECYCLE_WARMUP * n_epochs if lr_schedule == "onecycle" else 0.0
    )
    return n_epochs * steps_per_epoch, round(warmup * steps_per_epoch)


def shift_images(x: torch.Tensor, shifts: torch.Tensor, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Move each image of ``x`` (``(B, C, H, W)``) by whole pixels, repeating the edges.

    ``shifts`` is ``(B, 2)`` integers in ``[0, 2 * max_shift]``: the row and column offset
    plus ``max_shift``, so ``max_shift`` leaves an image where it is. Runs on ``x``'s device.
    """
    b, c, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), mode="replicate")
    rows = shifts[:, :1] + torch.arange(h, device=x.device)  # (B, H)
    cols = shifts[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
    flat = (rows[:, :, None] * (w + 2 * m) + cols[:, None, :]).view(b, 1, h * w)
    return padded.flatten(2).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


def _image_view(data: Dataset) -> tuple[int, ...]:
    """The ``(C, H, W)`` view of one example that ``augment="shift"`` moves; else a ValueError."""
    shape = tuple(data.input_shape) or tuple(data.x_train.shape[1:])
    if len(shape) == 2 and data.task == "classification":
        shape = (1, *shape)
    if len(shape) != 3 or math.prod(shape) != math.prod(data.x_train.shape[1:]):
        raise ValueError(
            f"augment='shift' needs image inputs (C, H, W); dataset {data.name!r} has examples "
            f"of shape {tuple(data.x_train.shape[1:])} (input_shape {data.input_shape}). Use "
            f"augment='none' for it"
        )
    return shape


class StepHook(Protocol):
    """Called by :func:`train_model` around each optimizer step (bio rules use this)."""

    def after_backward(self, model: nn.Module) -> None: ...

    def after_step(self, model: nn.Module) -> None: ...


@dataclass
class TrainResult:
    """What one training run produced.

    ``status`` is ``"completed"`` (all epochs), ``"stopped"`` (``on_epoch`` asked to stop,
    e.g. pruning) or ``"diverged"`` (non-finite loss; ``error`` says when). ``history`` has
    one dict per finished epoch with train/val/test loss and accuracy and seconds.
    Accuracies are ``None`` for regression tasks.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "completed"
    error: str | None = None
    n_params: int = 0
    wall_time: float = 0.0
    device: str = "cpu"
    seed: int = 0
    name: str = ""
    #: trained weights (CPU tensors), where the trainer hands them back (train_population)
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def _last(self, key: str) -> Any:
        return self.history[-1][key] if self.history else None

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def train_loss(self) -> float | None:
        return self._last("train_loss")

    @property
    def val_loss(self) -> float | None:
        return self._last("val_loss")

    @property
    def test_loss(self) -> float | None:
        return self._last("test_loss")

    @property
    def train_accuracy(self) -> float | None:
        return self._last("train_accuracy")

    @property
    def val_accuracy(self) -> float | None:
        return self._last("val_accuracy")

    @property
    def test_accuracy(self) -> float | None:
        return self._last("test_accuracy")

    @property
    def seconds_per_epoch(self) -> float:
        return self.wall_time / max(1, self.epochs_run)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("state_dict", None)
        for k in ("train_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy",
                  "test_accuracy", "epochs_run", "seconds_per_epoch"):
            d[k] = getattr(self, k)
        return d


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here")
    return dev


def make_optimizer(
    params: Any, lr: float, weight_decay: float, optimizer: str = "adam"
) -> torch.optim.Optimizer:
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    raise ValueError(f"optimizer must be one of 'adam', 'adamw', 'sgd', got {optimizer!r}")


def _loss(out: torch.Tensor, y: torch.Tensor, task: str, label_smoothing: float = 0.0) -> torch.Tensor:
    if task == "classification":
        if label_smoothing:
            return F.cross_entropy(out, y, label_smoothing=label_smoothing)
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y.view_as(out) if y.numel() == out.numel() else y)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "classification",
    batch_size: int = 4096,
) -> tuple[float, float | None]:
    """Mean loss and accuracy (``None`` for regression) of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        out = model(xb)
        total += _loss(out, yb, task) * len(xb)
        if task == "classification":
            correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(1, len(x))
    loss = float(total) / n
    return loss, (float(correct) / n if task == "classification" else None)


def train_model(
    model: nn.Module,
    data: Dataset,
    n_epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    seed: int = 0,
    on_epoch: OnEpoch | None = None,
    *,
    optimizer: torch.optim.Optimizer | str = "adam",
    grad_clip: float | None = None,
    step_hooks: Sequence[StepHook] = (),
    eval_test: bool = True,
    name: str = "",
    lr_schedule: str = "constant",
    warmup_epochs: float | None = None,
    label_smoothing: float = 0.0,
    augment: str = "none",
) -> TrainResult:
    """Train ``model`` on ``data`` with the whole dataset resident on ``device``.

    Each epoch visits the training split in a fresh order drawn from ``seed``. Dendritic
    layers resample their synapses as configured, without the caller registering hooks.
    After each epoch ``on_epoch(epoch, metrics)`` is called; a truthy return stops training
    with status ``"stopped"`` (this is how pruning stops a trial). A non-finite training loss
    ends the run with status ``"diverged"`` instead of raising.

    The recipe: ``lr_schedule`` sets each step's learning rate to ``lr`` (or the given
    optimizer's) times :func:`lr_multiplier`, over ``n_epochs`` planned epochs, with a linear
    warm-up of ``warmup_epochs`` (fractions allowed; default 0, or 30% of training for
    ``onecycle``). ``label_smoothing`` applies to the training loss only; validation and test
    losses stay plain cross-entropy. ``augment="shift"`` moves every training image by a
    random whole number of pixels, up to :data:`MAX_SHIFT` along each axis (edges repeated),
    on the device; flat inputs are viewed as the dataset's ``input_shape``. The shifts of an
    epoch are drawn right after its order, from the same seeded generator:
    ``torch.randint(0, 2 * MAX_SHIFT + 1, (n_train, 2))``, row ``i`` for the ``i``-th example
    visited. The defaults train exactly as before these options existed.
    """
    if n_epochs < 1:
        raise ValueError(f"n_epochs must be >= 1, got {n_epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {lr_schedule!r}")
    if warmup_epochs is not None and not 0 <= warmup_epochs <= n_epochs:
        raise ValueError(f"warmup_epochs must be in [0, n_epochs={n_epochs}], got {warmup_epochs!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if label_smoothing and data.task != "classification":
        raise ValueError(f"label_smoothing applies to classification only; dataset {data.name!r} is {data.task}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(map(repr, AUGMENTS))}, got {augment!r}")
    image = _image_view(data) if augment == "shift" else None
    dev = resolve_device(device)
    model = model.to(dev)
    d = data.to(dev)
    opt = (
        optimizer
        if isinstance(optimizer, torch.optim.Optimizer)
        else make_optimizer(model.parameters(), lr, weight_decay, optimizer)
    )
    dendritic: list[DendriticLayer | DendriticConv2d] = [
        m for m in model.modules() if isinstance(m, DendriticLayer) and not m._hooked
    ]
    dendritic += [m for m in model.modules() if isinstance(m, DendriticConv2d)]
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult(n_params=count_parameters(model), device=str(dev), seed=seed, name=name)
    n = len(d.x_train)
    classify = d.task == "classification"
    total_steps, warmup_steps = schedule_steps(n, batch_size, n_epochs, lr_schedule, warmup_epochs)
    scheduled = lr_schedule != "constant" or warmup_steps > 0
    base_lrs = [g["lr"] for g in opt.param_groups]
    step = 0
    start = time.perf_counter()
    model.train()
    for epoch in range(1, n_epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(dev)
        if image is not None:
            shifts = torch.randint(0, 2 * MAX_SHIFT + 1, (n, 2), generator=gen).to(dev)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = d.x_train[idx], d.y_train[idx]
            if image is not None:
                xb = shift_images(xb.view(len(idx), *image), shifts[i : i + batch_size]).view(xb.shape)
            out = model(xb)
            loss = _loss(out, yb, d.task, label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for h in step_hooks:
                h.after_backward(model)
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if scheduled:
                f = lr_multiplier(lr_schedule, step, total_steps, warmup_steps)
                for g, base in zip(opt.param_groups, base_lrs, strict=True):
                    g["lr"] = base * f
            step += 1
            opt.step()
            for h in step_hooks:
                h.after_step(model)
            for layer in dendritic:
                layer.step_resampling(opt)
            loss_sum += loss.detach() * len(idx)
            if classify:
                correct += (out.detach().argmax(1) == yb).sum()
        train_loss = float(loss_sum) / n
        if not math.isfinite(train_loss):
            result.status = "diverged"
            result.error = f"training loss became non-finite ({train_loss}) in epoch {epoch}"
            break
        val_loss, val_acc = evaluate(model, d.x_val, d.y_val, d.task)
        test_loss, test_acc = (
            evaluate(model, d.x_test, d.y_test, d.task) if eval_test else (None, None)
        )
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": float(correct) / n if classify else None,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "seconds": time.perf_counter() - t0,
            "n_params": result.n_params,
        }
        result.history.append(metrics)
        if on_epoch is not None and on_epoch(epoch, metrics):
            result.status = "stopped"
            break
    if scheduled:  # hand a caller's optimizer back with the learning rates it came with
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base
    result.wall_time = time.perf_counter() - start
    return result


def compare_models(
    models_config: Sequence[tuple[nn.Module, torch.optim.Optimizer | None, str]],
    dataset: str | Dataset = "fashion-mnist",
    n_epochs: int = 20,
    batch_size: int = 128,
    *,
    lr: float = 1e-3,
    device: str | torch.device | None = None,
    seed: int = 0,
    subset_size: int | None = None,
    data_dir: str | None = None,
    verbose: bool = False,
) -> dict[str, TrainResult]:
    """Train several models on one dataset and return their results side by side, by name.

    ``models_config`` holds ``(model, optimizer, name)`` as in the seed project; an
    optimizer of ``None`` means Adam with ``lr``.
    """
    data = (
        dataset
        if isinstance(dataset, Dataset)
        else load_dataset(dataset, data_dir=data_dir, subset_size=subset_size, seed=seed)
    )
    results: dict[str, TrainResult] = {}
    for model, opt, label in models_config:
        if label in results:
            raise ValueError(f"model names in models_config must be unique, {label!r} repeats")
        res = train_model(
            model, data, n_epochs=n_epochs, lr=lr, batch_size=batch_size, device=device,
            seed=seed, optimizer=opt if opt is not None else "adam", name=label,
        )
        results[label] = res
        if verbose:
            print(
                f"{label:>20s}: test acc {res.test_accuracy:.4f}  val acc {res.val_accuracy:.4f}"
                f"  params {res.n_params}  {res.seconds_per_epoch:.2f}s/epoch"
            )
    return results
