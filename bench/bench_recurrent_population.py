"""train_recurrent_population against train_model one model at a time: model-epochs per second.

    python bench/bench_recurrent_population.py [--device cpu|cuda] [--families diru,lstm,gru]
        [--populations 1,8,64,256] [--epochs 2] [--n-samples 2500] [--seq-len 50]
        [--hidden 32] [--batch-size 128] [--solo 4] [--threads N]

Members are the default-sized models of each family (``hidden_size`` 32, DIRU with 4
compartments) on ``multi_sine`` (``n_samples`` sequences of ``seq_len`` steps, 90% for
training), with seeds 0..K-1 and learning rates spread over 1e-3..3e-3 so that members
differ. Rows: (b) ``core.train_model`` on ``--solo`` members one after another; (c)
``core.train_recurrent_population`` with K members at once. "model-epochs/s" counts every
member's epochs over the whole call, set-up included; "speed-up" is over (b). "max |d val|"
is the largest difference in final validation loss between a member of (c) and the same
member trained by (b) (members 0..solo-1), which should be float noise.
"""

from __future__ import annotations

import argparse
import time

import torch

import core


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _configs(k: int, hidden: int) -> list[dict[str, float | int]]:
    return [dict(hidden_size=hidden, lr=1e-3 + 2e-3 * (i % 8) / 7, seed=i) for i in range(k)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--families", default="diru,lstm,gru")
    ap.add_argument("--populations", help="comma-separated K (default 1,8,32 on CPU, 1,8,64,256 on CUDA)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=2500)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--solo", type=int, default=4, help="members trained one at a time for (b)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = core.resolve_device(args.device)
    pops = [int(k) for k in (args.populations or ("1,8,64,256" if dev.type == "cuda" else "1,8,32")).split(",")]
    data = core.load_dataset("multi_sine", seed=0, n_samples=args.n_samples, seq_len=args.seq_len)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {dev} ({gpu}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"multi_sine train {tuple(data.x_train.shape)}, batch {args.batch_size}, "
          f"{args.epochs} epochs, hidden {args.hidden}")
    for family in args.families.split(","):
        # warm-up: kernels, allocator, lazy imports
        core.train_recurrent_population(family, _configs(1, args.hidden), data, 1, args.batch_size,
                                        device=dev)
        solo_cfgs = _configs(args.solo, args.hidden)
        solo_val: list[float] = []
        _sync(dev)
        t0 = time.perf_counter()
        for cfg in solo_cfgs:
            c = dict(cfg)
            lr, seed = float(c.pop("lr")), int(c.pop("seed"))
            model = core.create_model(family, seed=seed, in_dim=data.in_features,
                                      out_dim=data.out_dim, **c)
            res = core.train_model(model, data, args.epochs, lr, batch_size=args.batch_size,
                                   device=dev, seed=seed)
            solo_val.append(res.val_loss or 0.0)
        _sync(dev)
        solo_rate = args.solo * args.epochs / (time.perf_counter() - t0)
        n_params = core.analytic_parameter_count(family, in_dim=1, out_dim=1, hidden_size=args.hidden)
        print(f"\n{family} ({n_params} parameters per member)")
        print(f"{'row':<40s} {'model-epochs/s':>15s} {'speed-up':>9s} {'max |d val|':>12s}")
        print(f"{'(b) train_model, one at a time':<40s} {solo_rate:>15.2f} {1.0:>8.1f}x {'':>12s}")
        for k in pops:
            _sync(dev)
            t0 = time.perf_counter()
            results = core.train_recurrent_population(
                family, _configs(k, args.hidden), data, args.epochs, args.batch_size, device=dev,
                population_size=k)
            _sync(dev)
            rate = k * args.epochs / (time.perf_counter() - t0)
            diff = max(abs((r.val_loss or 0.0) - v) for r, v in zip(results, solo_val, strict=False))
            print(f"{'(c) train_recurrent_population K=' + str(k):<40s} {rate:>15.2f} "
                  f"{rate / solo_rate:>8.1f}x {diff:>12.2e}")


if __name__ == "__main__":
    main()
