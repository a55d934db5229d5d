"""Cost of growth wrappers: ResNet-18 seconds per epoch, plain against growable with no sets.

    python bench/bench_growth.py [--device cpu|cuda] [--n-images 2048] [--epochs 3] [--grown]

Random CIFAR-shaped data (3x32x32, 10 classes) resident on the device, batch 128, SGD.
The variants are timed epoch by epoch in turn, so drift in clock or load hits them alike;
each is reported as its median epoch, with its ratio to the plain model. ``--grown`` also
times the model with one dendrite set grown on every layer (about twice the parameters).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

import core


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _epoch(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    batch_size: int, limit: int | None = None,
) -> float:
    """Seconds for one pass over ``(x, y)`` (or its first ``limit`` batches)."""
    _sync(x.device)
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, len(x), batch_size)):
        if limit is not None and i >= limit:
            break
        loss = F.cross_entropy(model(x[start:start + batch_size]), y[start:start + batch_size])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(x.device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per variant")
    ap.add_argument("--warmup-batches", type=int, default=2)
    ap.add_argument("--grown", action="store_true", help="also time one grown dendrite set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dev = core.resolve_device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.n_images, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (args.n_images,), generator=g).to(dev)

    def growable(n_sets: int) -> Callable[[nn.Module], None]:
        def prepare(model: nn.Module) -> None:
            core.make_growable(model)
            for k in range(n_sets):
                core.grow(model, seed=args.seed + k)

        return prepare

    variants: dict[str, Callable[[nn.Module], None]] = {
        "plain": lambda model: None,
        "growable, 0 sets": growable(0),
    }
    if args.grown:
        variants["growable, 1 set"] = growable(1)
    runs = {}
    for label, prepare in variants.items():
        model = core.create_model("resnet18", seed=args.seed, n_classes=10)
        prepare(model)
        model = model.to(dev).train()
        opt = core.make_optimizer(model.parameters(), 0.05, 5e-4, "sgd")
        _epoch(model, opt, x, y, args.batch_size, limit=args.warmup_batches)
        runs[label] = (model, opt, core.count_parameters(model), [])
    for _ in range(args.epochs):
        for model, opt, _, times in runs.values():
            times.append(_epoch(model, opt, x, y, args.batch_size))

    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{torch.get_num_threads()} threads"
    print(f"# ResNet-18 on {args.n_images} random 3x32x32 images, batch {args.batch_size}, "
          f"{args.epochs} timed epochs, {dev} ({name}), torch {torch.__version__}")
    base = statistics.median(runs["plain"][3])
    print(f"{'variant':20s} {'params':>11s} {'s/epoch':>9s} {'min':>9s} {'ratio':>7s}")
    for label, (_, _, n_params, times) in runs.items():
        med = statistics.median(times)
        print(f"{label:20s} {n_params:11d} {med:9.3f} {min(times):9.3f} {med / base:6.3f}x")
    overhead = statistics.median(runs["growable, 0 sets"][3]) / base
    print(f"overhead of growth wrappers with no sets: {overhead:.3f}x "
          f"({(overhead - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
