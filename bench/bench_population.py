"""train_population against the seed-style loop, train_model and the torch.func ensemble.

    python bench/bench_population.py [--device cpu|cuda] [--epochs 2] [--populations 8]
                                     [--precisions fp32,tf32,bf16] [--func-populations K,..]
                                     [--hetero K] [--ceilings] [--data-dir DIR] [--subset N]
                                     [--threads N] [--profile]

dendritic_simple with 12 neurons, 6 dendrites, 96 inputs per dendrite, batch 256, on
Fashion-MNIST. Rows, all measured in this one run: (a) the seed-style loop
(bench/_baseline.py: DataLoader over CPU tensors, a dense masked weight, resampling on the
mask), (b) core.train_model, (f) the torch.func ensemble a PyTorch user writes
(stack_module_state + functional_call + vmap, one fused Adam, own batch order per member),
(c) core.train_population with K members (seeds 0..K-1, member 0 is the model of (b)) at
each precision. "whole" counts every member's epochs over the whole call, set-up included;
"steady" is K over the last epoch's seconds; "w/s" is whole over steady. Ratios are of
steady rates. "test acc" is the mean final test accuracy per member; "|d acc|" is, for
fp32, member 0's difference from (b) (the same model), and for tf32/bf16 the largest
per-member difference from the fp32 population of the same K (same seeds), mean in brackets.
The pseudo-precision ``fp32~`` is exact fp32 again on training inputs multiplied by
(1 + 2^-22), a rounding error: its |d acc| is the noise floor of a member's final accuracy,
what any change of arithmetic order alone does to it.
``--hetero K`` trains K members of mixed sizes (the seed search space) and reports the
useful / executed FLOPs of the size buckets. ``--ceilings`` first measures this machine's
matrix-product rates and copy bandwidth. ``--profile`` prints the kernels of one epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baseline import cuda_seconds, func_ensemble_train, seed_style_train  # noqa: E402

import core  # noqa: E402

SIZES = dict(n_neurons=12, n_dendrites=6, n_dendrite_inputs=96)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def ceilings(dev: torch.device) -> dict[str, float]:
    """Matrix-product FLOP/s (fp32, tf32, bf16; random data) and device copy bytes/s."""
    out: dict[str, float] = {}

    tf32 = torch.backends.cuda.matmul.allow_tf32
    n = 8192
    for name, dtype, allow in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                               ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = allow
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        out[f"matmul {name} FLOP/s"] = 2 * n**3 / cuda_seconds(lambda a=a, b=b: a @ b)
        # the population's own shape: K=1024 members, batch 256, dense 784 -> 72
        x = torch.randn(1024, 256, 784, device=dev, dtype=dtype)
        w = torch.randn(1024, 72, 784, device=dev, dtype=dtype)
        out[f"bmm 1024x(256x784 @ 784x72) {name} FLOP/s"] = (
            2 * 1024 * 256 * 784 * 72 / cuda_seconds(lambda x=x, w=w: torch.bmm(x, w.transpose(1, 2))))
        del a, b, x, w
    torch.backends.cuda.matmul.allow_tf32 = tf32
    src = torch.randn(1 << 29, device=dev)  # 2 GiB
    dst = torch.empty_like(src)
    out["copy bytes/s (read+write)"] = 2 * src.numel() * 4 / cuda_seconds(lambda d=dst, s=src: d.copy_(s))
    del src, dst
    torch.cuda.empty_cache()
    return out


def _population(data: core.Dataset, configs: list[dict[str, Any]], epochs: int, args: Any,
                dev: torch.device, precision: str) -> tuple[float, float, list[core.TrainResult]]:
    stats: dict[str, Any] = {}
    _sync(dev)
    t0 = time.perf_counter()
    res = core.train_population("dendritic_simple", configs, data, epochs, args.batch_size,
                                device=dev, population_size=len(configs), precision=precision,
                                stats=stats)
    _sync(dev)
    wall = time.perf_counter() - t0
    epochs_s = [round(h["seconds"], 3) for h in res[0].history]
    print(f"#   K={len(configs)} {precision}: wall {wall:.2f}s = build {stats['build_seconds']:.2f} + "
          f"epochs {stats['epoch_seconds']:.2f} (of which keeping weights {stats['keep_seconds']:.2f}); "
          f"epoch seconds {epochs_s}; main thread on staging {stats['staging_seconds']} "
          f"({stats['staged_here']} staged there)", flush=True)
    return wall, res[0].history[-1]["seconds"], res


def seed_space(k: int, rng: random.Random, max_params: int = 8000) -> list[dict[str, Any]]:
    """Mixed sizes as the seed search proposes them, each under ``max_params``."""
    out: list[dict[str, Any]] = []
    while len(out) < k:
        cfg = dict(n_neurons=rng.randint(4, 32), n_dendrites=rng.randint(2, 16),
                   n_dendrite_inputs=rng.randint(8, 128))
        if core.analytic_parameter_count("dendritic_simple", in_dim=784, n_classes=10, **cfg) <= max_params:
            out.append(dict(cfg, lr=10 ** rng.uniform(-3.3, -2.0), seed=len(out)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--base-epochs", type=int, default=2, help="epochs of rows (a) and (b)")
    ap.add_argument("--populations", help="comma-separated K (default 8 on CPU, 1024 on CUDA)")
    ap.add_argument("--func-populations", help="K of the torch.func rows (default: --populations)")
    ap.add_argument("--precisions", default="fp32", help="comma-separated: fp32, tf32, bf16")
    ap.add_argument("--hetero", type=int, default=0, help="also train K members of mixed sizes")
    ap.add_argument("--hetero-epochs", type=int, default=0, help="their epochs (default --epochs)")
    ap.add_argument("--ceilings", action="store_true", help="measure FLOP/s and copy bytes/s first")
    ap.add_argument("--data-dir")
    ap.add_argument("--subset", type=int, help="training examples to keep (before validation)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--profile", action="store_true", help="profile one epoch of the largest K")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = core.resolve_device(args.device)
    pops = [int(x) for x in (args.populations or ("1024" if dev.type == "cuda" else "8")).split(",")]
    fpops = [int(x) for x in args.func_populations.split(",")] if args.func_populations else pops
    precisions = args.precisions.split(",")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.ceilings and dev.type == "cuda":
        for key, value in ceilings(dev).items():
            unit = "TB/s" if "bytes" in key else "TFLOP/s"
            print(f"# ceiling {key:45s} {value / 1e12:8.1f} {unit}", flush=True)
    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir, subset_size=args.subset)
    print(f"# fashion-mnist {data.sizes()} on {dev} ({name}), torch {torch.__version__}; "
          f"dendritic_simple {SIZES}, batch {args.batch_size}, lr {args.lr}, {args.epochs} epochs "
          f"(rows a, b: {args.base_epochs})", flush=True)

    # a warm-up, so that no row pays for CUDA/cuBLAS initialisation (or Triton compiling)
    for prec in dict.fromkeys(p.rstrip("~") for p in precisions):
        core.train_population("dendritic_simple", [dict(SIZES)] * 2, data, 1, args.batch_size,
                              device=dev, precision=prec)

    base = seed_style_train(data, SIZES["n_neurons"], SIZES["n_dendrites"], SIZES["n_dendrite_inputs"],
                            args.base_epochs, args.batch_size, args.lr, dev)
    base_rate = 1.0 / base["seconds_per_epoch"]
    rows: list[tuple[str, float, float, float, str]] = [
        ("(a) seed-style loop", base_rate, base_rate, base["test_accuracy"], "")]

    model = core.create_model("dendritic_simple", seed=0, in_dim=data.in_dim, **SIZES)
    _sync(dev)
    t0 = time.perf_counter()
    single = core.train_model(model, data, args.base_epochs, args.lr, batch_size=args.batch_size,
                              device=dev, seed=0)
    _sync(dev)
    rate = args.base_epochs / (time.perf_counter() - t0)
    rows.append(("(b) core.train_model", rate, 1.0 / single.history[-1]["seconds"],
                 single.test_accuracy or 0.0, ""))

    func_rate: float | None = None
    for k in fpops:
        fr = func_ensemble_train(data, k, SIZES, args.epochs, args.batch_size, args.lr, dev)
        steady = k / fr["last_epoch_seconds"]
        func_rate = steady
        rows.append((f"(f) torch.func ensemble K={k}", k * args.epochs / fr["seconds"], steady,
                     sum(fr["test_accuracy"]) / k, ""))
        print(f"#   {rows[-1][0]}: steady {steady:.1f}", flush=True)

    for k in pops:
        configs = [dict(SIZES, lr=args.lr, seed=i) for i in range(k)]
        ref: list[float] | None = None
        for prec in precisions:
            if prec == "fp32~":  # exact fp32 again, on inputs moved by a rounding error: the noise floor
                nudged = dataclasses.replace(data, x_train=data.x_train * (1 + 2.0**-22))
                wall, last, res = _population(nudged, configs, args.epochs, args, dev, "fp32")
            else:
                wall, last, res = _population(data, configs, args.epochs, args, dev, prec)
            accs = [r.test_accuracy or 0.0 for r in res]
            if prec == "fp32":
                ref = accs
                note = f"{abs(accs[0] - (single.test_accuracy or 0.0)):.4f} m0" if args.epochs == args.base_epochs else ""
            elif ref is not None:
                diffs = [abs(a - b) for a, b in zip(accs, ref, strict=True)]
                note = f"{max(diffs):.4f} ({sum(diffs) / len(diffs):.4f})"
            else:
                note = ""
            rows.append((f"(c) train_population K={k} {prec}", k * args.epochs / wall, k / last,
                         sum(accs) / k, note))
            print(f"#   {rows[-1][0]}: whole {rows[-1][1]:.1f} steady {rows[-1][2]:.1f}", flush=True)

    if args.hetero:
        configs = seed_space(args.hetero, random.Random(0))
        for prec in precisions[-1:]:
            stats: dict[str, Any] = {}
            _sync(dev)
            t0 = time.perf_counter()
            h_epochs = args.hetero_epochs or args.epochs
            res = core.train_population("dendritic_simple", configs, data, h_epochs, args.batch_size,
                                        device=dev, population_size=len(configs), precision=prec,
                                        stats=stats)
            _sync(dev)
            wall = time.perf_counter() - t0
            last = max(r.history[-1]["seconds"] for r in res)
            rows.append((f"(h) mixed sizes K={len(configs)} {prec}", len(configs) * h_epochs / wall,
                         len(configs) / last, sum(r.test_accuracy or 0.0 for r in res) / len(res), ""))
            ratio = stats["useful_flops"] / max(1.0, stats["executed_flops"])
            plain: dict[str, Any] = {}
            core.train_population("dendritic_simple", configs, data, 1, args.batch_size, device=dev,
                                  population_size=len(configs), precision=prec, buckets=False,
                                  stats=plain)
            plain_ratio = plain["useful_flops"] / max(1.0, plain["executed_flops"])
            rate = stats["useful_flops"] / max(1e-9, stats["epoch_seconds"])
            print(f"# mixed sizes K={len(configs)} {prec}: {stats['buckets']} buckets "
                  f"{stats['stacks'][:12]}; useful/executed FLOPs {ratio:.2f} (one padded stack: "
                  f"{plain_ratio:.2f}); useful {rate / 1e12:.1f} TFLOP/s over the epochs; wall "
                  f"{wall:.1f}s = build {stats['build_seconds']:.1f} + epochs {stats['epoch_seconds']:.1f}",
                  flush=True)

    print(f"{'trainer':38s} {'whole':>9s} {'steady':>9s} {'w/s':>5s} {'vs (a)':>8s} {'vs (f)':>7s} "
          f"{'test acc':>9s} {'|d acc|':>16s}")
    for label, whole, steady, acc, note in rows:
        vs_f = f"{steady / func_rate:6.2f}x" if func_rate else "      -"
        print(f"{label:38s} {whole:9.1f} {steady:9.1f} {whole / steady:5.2f} {steady / base_rate:7.0f}x "
              f"{vs_f} {acc:9.4f} {note:>16s}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        configs = [dict(SIZES, lr=args.lr, seed=i) for i in range(max(pops))]
        with profile(activities=acts) as prof:
            _population(data, configs, 1, args, dev, precisions[-1])
        key = "cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
