"""DIRU against LSTM and GRU under one parameter budget: the diru-vs-lstm preset on three tasks.

    python bench/bench_diru.py [--max-params 5000] [--n-trials 12] [--n-epochs 15] [--n-seeds 5]
                               [--subset N] [--batch-size 128] [--device cpu] [--threads 1]
                               [--storage URL] [--out DIR] [--in-population] [--seed S]
    python bench/bench_diru.py --population [--device cpu] [--threads 1]
    python bench/bench_diru.py --speed --device cuda [--n-trials 200] [--n-epochs 30] [--n-seeds 5]
                               [--single-trials 2] [--single-tasks multi_sine]

The first form runs ``studies.diru_vs_lstm`` (TPE per task and family, same budget, trials,
epochs and data; each study's best re-trained with ``--n-seeds`` fresh seeds) and prints its
table, then our improvement of DIRU over LSTM beside the seed's claimed one, whichever way
ours comes out. With ``--out`` the preset's JSON and HTML report are written there. Studies
live in memory unless ``--storage`` is given. ``--in-population`` runs the same table with
``population="auto"``: at equal trials, epochs and seeds, its rows against the one-trial
table's are the check that the population path finds results within noise. ``--seed`` is the
studies' seed (the TPE sampler's and the trials' training seeds; the data split and the
re-training seeds stay): two seeds of the one-trial table show how far the search alone moves
a row, the noise that check is against.

``--speed`` runs the whole preset with ``population="auto"`` (every family's trials trained
together, the seeds' re-trainings together), prints its table, then runs the same preset one
trial at a time on ``--single-trials`` trials of ``--single-tasks`` (the one-trial path at
200 trials per study would take hours) and compares model-epochs per second: every epoch
that any trial or re-training ran, over the wall time of the whole preset call.

``--population`` measures instead whether training K DIRU trials at once would pay: one
training step (forward, backward, Adam; batch 128, 50 steps, hidden 32, 4 compartments) of
one model, of K models stepped one after the other, and of K models whose weights are
stacked so that each time step is one batched matmul (a hand-written step for the
measurement, not a trainer).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import core  # noqa: E402


def _comparison(args: argparse.Namespace) -> None:
    # Imported here: --population needs only torch and core (and runs where Optuna is absent).
    import optuna

    from studies import _diru

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = args.storage or optuna.storages.InMemoryStorage()
    t0 = time.perf_counter()
    res = _diru.diru_vs_lstm(
        max_params=args.max_params, n_trials=args.n_trials, n_epochs=args.n_epochs,
        n_seeds=args.n_seeds, subset_size=args.subset, batch_size=args.batch_size,
        storage=storage, out_dir=args.out, device=args.device, show_progress=args.progress,
        population="auto" if args.in_population else None, seed=args.seed, tasks=args.tasks.split(","),
    )
    wall = time.perf_counter() - t0
    s = res.settings
    print(f"diru-vs-lstm: max_params={s['max_params']}, {s['n_trials']} TPE trials per task and "
          f"family (median pruner), {s['n_epochs']} epochs, batch {s['batch_size']}, subset "
          f"{s['subset_size'] or 'all 2500 (2250 train / 250 val)'}, test 500 sequences of 50 steps; "
          f"best re-trained with {s['n_seeds']} seeds; device {s['device']}, "
          f"{torch.get_num_threads()} thread(s); "
          f"{'population=auto' if args.in_population else 'one trial at a time'}; "
          # Named only when not the default, so that seed 0's output reads as it always did.
          f"{f'search seed {args.seed}; ' if args.seed else ''}{wall / 60:.1f} min")
    print()
    print(_diru.format_comparison(res))
    print()
    print(f"{'task':<13} {'DIRU test MSE':>15} {'LSTM test MSE':>15} {'ours vs LSTM':>12} "
          f"{'seed claims':>11}")
    rows = {(r["task"], r["family"]): r for r in res.table}
    for e in res.improvements:
        d, b = rows[(e["task"], "diru")], rows[(e["task"], "lstm")]

        def cell(r: dict) -> str:
            return f"{r['test_mse_mean']:.4f}±{r['test_mse_std']:.4f}"

        print(f"{e['task']:<13} {cell(d):>15} {cell(b):>15} {e['vs_lstm_pct']:>+11.1f}% "
              f"{e['seed_claim_vs_lstm_pct']:>+10.1f}%")


def _model_epochs(storage: object, res: object) -> int:
    import optuna

    n = 0
    for name in res.studies:  # type: ignore[attr-defined]
        study = optuna.load_study(study_name=name, storage=storage)
        n += sum(int(t.user_attrs.get("epochs_run", 0)) for t in study.get_trials(deepcopy=False))
    for task in res.seeds.values():  # type: ignore[attr-defined]
        for detail in task.values():
            n += sum(len(r["history"]) for r in detail["runs"])
    return n


def _speed(args: argparse.Namespace) -> None:
    """The preset in population mode against the one-trial path: model-epochs per second."""
    import optuna

    from studies import _diru

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kw = dict(max_params=args.max_params, n_epochs=args.n_epochs, subset_size=args.subset,
              batch_size=args.batch_size, device=args.device, show_progress=args.progress, seed=args.seed)
    url = args.storage or f"sqlite:///{Path('/tmp') / f'bench_diru_speed_{int(time.time())}.db'}"
    pop_me, pop_wall = 0, 0.0
    for task in args.tasks.split(",") if args.only != "s" else []:  # one task at a time: partial rows print
        t0 = time.perf_counter()
        pop = _diru.diru_vs_lstm(n_trials=args.n_trials, n_seeds=args.n_seeds, storage=url,
                                 population="auto", dataset=task, **kw)
        wall = time.perf_counter() - t0
        me = _model_epochs(url, pop)
        pop_me, pop_wall = pop_me + me, pop_wall + wall
        print(f"(p) population=auto on {task}: {args.n_trials} trials per family, {args.n_epochs} epochs, "
              f"{args.n_seeds} seeds: {wall:.1f} s, {me} model-epochs -> {me / wall:.1f} model-epochs/s",
              flush=True)
        print(_diru.format_comparison(pop), flush=True)
    if pop_wall:
        print(f"(p) in all: {pop_wall:.1f} s, {pop_me} model-epochs -> {pop_me / pop_wall:.1f} "
              f"model-epochs/s", flush=True)
    single_me, single_wall = 0, 0.0
    for task in args.single_tasks.split(",") if args.only != "p" else []:
        mem = optuna.storages.InMemoryStorage()
        t0 = time.perf_counter()
        one = _diru.diru_vs_lstm(n_trials=args.single_trials, n_seeds=1, storage=mem, dataset=task, **kw)
        single_wall += time.perf_counter() - t0
        single_me += _model_epochs(mem, one)
    if not single_wall:
        return
    print(f"(s) one trial at a time: {args.single_trials} trials per family on {args.single_tasks}, "
          f"{args.n_epochs} epochs, 1 seed: {single_wall:.1f} s, {single_me} model-epochs -> "
          f"{single_me / single_wall:.2f} model-epochs/s")
    if not pop_wall:
        return
    speed = (pop_me / pop_wall) / (single_me / single_wall)
    print(f"speed-up of the population path: {speed:.0f}x model-epochs/s; the whole (p) run one trial "
          f"at a time would take ~{pop_me / (single_me / single_wall) / 3600:.1f} h")


# -- population: does stepping K DIRU models together pay? ------------------------------------
def _stacked_step(x_proj: torch.Tensor, h: torch.Tensor, w_hh_t: torch.Tensor, w_int_t: torch.Tensor,
                  b_int: torch.Tensor, n: int) -> torch.Tensor:
    """DIRUCell.step for K models at once: tensors carry a leading model axis."""
    pre = torch.baddbmm(x_proj, h, w_hh_t)
    gates = torch.sigmoid(pre[..., n:])
    local = gates[..., :n] * torch.tanh(pre[..., :n])
    soma = torch.baddbmm(b_int, local, w_int_t)
    return torch.lerp(h, torch.tanh(soma), gates[..., n:])


def _stacked_params(k: int, i: int, h: int, n: int, dev: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = 1 / math.sqrt(h)
    shapes = [(k, 2 * n + h, i), (k, 1, 2 * n + h), (k, h, 2 * n + h), (k, n, h), (k, 1, h),
              (k, h, 1), (k, 1, 1)]
    return [((torch.rand(s, generator=g) * 2 - 1) * b).to(dev).requires_grad_() for s in shapes]


def _time(fn: object, dev: torch.device, reps: int) -> float:
    for _ in range(3):  # warm-up: allocator, autograd graph caches, CUDA context
        fn()  # type: ignore[operator]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()  # type: ignore[operator]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _stacked_train_step(params: list[torch.Tensor], opt: torch.optim.Optimizer, x: torch.Tensor,
                        y: torch.Tensor, k: int, h: int, n: int) -> None:
    """One training step of K stacked DIRU models on the same batch."""
    w_ih, bias, w_hh_t, w_int_t, b_int, w_out, b_out = params
    xk = x.unsqueeze(0).expand(k, -1, -1, -1)
    # Input projections of every step outside the time loop, as DIRU.encode does.
    # unbind, not proj[t]: indexing would give every step a full-size zero gradient in backward.
    proj = (torch.einsum("kbti,kgi->tkbg", xk, w_ih) + bias.unsqueeze(0)).contiguous()
    hk = x.new_zeros(k, x.shape[0], h)
    for x_t in proj.unbind(0):
        hk = _stacked_step(x_t, hk, w_hh_t, w_int_t, b_int, n)
    out = torch.baddbmm(b_out, hk, w_out)
    loss = F.mse_loss(out, y.expand(k, -1, -1)) * k  # the sum of each model's own mean
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _model_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor) -> None:
    loss = F.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _population(args: argparse.Namespace) -> None:
    dev = core.resolve_device(args.device)
    i, h, comps, batch, steps = 1, 32, 4, 128, 50
    n = comps * math.ceil(h / comps)
    x = torch.randn(batch, steps, i, device=dev)
    y = torch.randn(batch, 1, device=dev)
    models = [core.create_model("diru", seed=s, in_dim=i, out_dim=1, hidden_size=h,
                                num_compartments=comps).to(dev) for s in range(max(args.ks))]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    t1 = _time(lambda: _model_step(models[0], opts[0], x, y), dev, args.reps)
    print(f"DIRU h={h}, {comps} compartments ({core.count_parameters(models[0])} parameters), "
          f"batch {batch}, {steps} steps, on {dev} with {torch.get_num_threads()} thread(s): "
          f"one training step (forward, backward, Adam)")
    print(f"{'K':>5} {'loop of K models':>17} {'stacked K models':>17} {'stacked / loop':>15} "
          f"{'stacked per model':>18}")
    for k in args.ks:
        pairs = list(zip(models[:k], opts[:k], strict=True))
        params = _stacked_params(k, i, h, n, dev)
        opt = torch.optim.Adam(params, lr=1e-3)
        def loop(pairs: list = pairs) -> None:
            for m, o in pairs:
                _model_step(m, o, x, y)

        tl = _time(loop, dev, max(2, args.reps // k))
        ts = _time(lambda params=params, opt=opt, k=k: _stacked_train_step(params, opt, x, y, k, h, n),
                   dev, args.reps)
        print(f"{k:>5} {tl * 1e3:>14.1f} ms {ts * 1e3:>14.1f} ms {ts / tl:>15.2f} "
              f"{ts / k * 1e3:>15.2f} ms")
    print(f"(one model alone: {t1 * 1e3:.1f} ms per step)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-params", type=int, default=5000)
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--n-epochs", type=int, default=15)
    ap.add_argument("--n-seeds", type=int, default=5)
    ap.add_argument("--subset", type=int, help="sequences of each task's pool to use (default all)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the per-step matmuls are tiny)")
    ap.add_argument("--storage", help="database URL; default in memory")
    ap.add_argument("--out", help="directory for the preset's JSON and HTML report")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--population", action="store_true",
                    help="measure stepping K DIRU models together instead")
    ap.add_argument("--seed", type=int, default=0,
                    help="studies' seed: TPE sampler and trial training (default 0, the preset's)")
    ap.add_argument("--in-population", action="store_true",
                    help="the first form with population='auto' (the equal-trial check against one trial at a time)")
    ap.add_argument("--speed", action="store_true",
                    help="the preset in population mode against the one-trial path")
    ap.add_argument("--single-trials", type=int, default=2, help="trials per study of --speed's one-trial run")
    ap.add_argument("--single-tasks", default="multi_sine", help="tasks of --speed's one-trial run")
    ap.add_argument("--tasks", default="multi_sine,delay_recall,lorenz", help="tasks of the table, or of --speed's population run")
    ap.add_argument("--only", choices=["p", "s"], help="--speed: only the population (p) or one-trial (s) run")
    ap.add_argument("--ks", default="1,4,16,64", help="K values for --population")
    ap.add_argument("--reps", type=int, default=20, help="timed steps for --population")
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.speed:
        _speed(args)
    elif args.population:
        _population(args)
    else:
        _comparison(args)


if __name__ == "__main__":
    main()
