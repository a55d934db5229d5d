"""Bio rules in a population against the lone trial: model-epochs per second.

    python bench/bench_bio_population.py [--device cuda] [--populations 256,1024] [--epochs 2]
        [--solo-epochs 1] [--data-dir DIR] [--subset N]

The model of the ``bio-rules`` preset (``dendritic_simple`` 10 neurons x 23 dendrites x 32
inputs, batch 128) on Fashion-MNIST. Row (s): ``create_model`` + ``BioConverter`` +
``train_model`` with a ``BioStepHook``, one model. Rows (p): ``core.train_population`` with K
members, each with its own rules drawn in turn from a list of ten (every fuzzy-rate
distribution, Dale's principle, volume-dependent lr, rejuvenation, homeostatic scaling),
seed and lr. "model-epochs/s" counts every member's epochs over the whole call (building
included); "speed-up" is over (s).

    python bench/bench_bio_population.py --preset [--device cuda] [--n-trials 200]
        [--single-trials 2] [--n-epochs 10] [--data-dir DIR] [--subset N]

``--preset`` times the ``bio-rules`` preset itself, as ``dendro search --preset bio-rules``
runs it (both studies, TPE + median pruner, SQLite storage): once with ``population="auto"``
at ``--n-trials`` trials per study, once one trial at a time at ``--single-trials``, and
compares model-epochs per second (every epoch any trial ran, over the preset call's wall time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import core  # noqa: E402

MODEL = dict(n_neurons=10, n_dendrites=23, n_dendrite_inputs=32)
RULES: list[dict[str, Any]] = [
    dict(fuzzy_lr_distribution="uniform"),
    dict(fuzzy_lr_distribution="normal", volume_dependent=True),
    dict(fuzzy_lr_distribution="lognormal", rejuvenate_every=200),
    dict(fuzzy_lr_distribution="gamma", apply_dales_principle=True),
    dict(fuzzy_lr_distribution="beta", scale_grad=True, homeostatic_strength=0.5),
    dict(fuzzy_lr_distribution="layer_adaptive", crystallize=False),
    dict(fuzzy_lr_distribution="weight_adaptive", apply_dales_principle=True, rejuvenate_every=1000),
    dict(fuzzy_lr_distribution="temporal", fuzzy_lr_dynamic=True, fuzzy_lr_update_freq=50),
    dict(fuzzy_lr_distribution="activity", fuzzy_lr_dynamic=True, fuzzy_lr_update_freq=50),
    dict(fuzzy_lr_distribution="baseline"),
]
_HOOK = {"fuzzy", "crystallize", "volume_dependent", "scale_grad", "dales", "update_rates", "rejuvenate_every"}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _preset(args: argparse.Namespace) -> None:
    import optuna

    import studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rates = {}
    for label, n, pop in (("p", args.n_trials, "auto"), ("s", args.single_trials, None)):
        url = f"sqlite:///{Path('/tmp') / f'bench_bio_preset_{label}_{int(time.time())}.db'}"
        t0 = time.perf_counter()
        res = studies.bio_rules_search(n_trials=n, n_epochs=args.n_epochs, storage=url, device=args.device,
                                       data_dir=args.data_dir, subset_size=args.subset, show_progress=False,
                                       population=pop)
        wall = time.perf_counter() - t0
        me, sizes = 0, set()
        for name in res.studies:
            for t in optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False):
                me += int(t.user_attrs.get("epochs_run", 0))
                sizes.add(t.user_attrs.get("population_size"))
        rates[label] = me / wall
        print(f"({label}) bio-rules preset, population={pop}: {n} trials per study, {args.n_epochs} epochs: "
              f"{wall:.1f} s, {me} model-epochs -> {me / wall:.2f} model-epochs/s; population_size seen "
              f"{min(x for x in sizes if x is not None)}..{max(x for x in sizes if x is not None)}", flush=True)
        for row in res.table:
            print(f"    {row}", flush=True)
    print(f"speed-up of the population path on the preset: {rates['p'] / rates['s']:.1f}x model-epochs/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--populations", default=None, help="comma-separated K (default 8 on CPU, 256,1024 on CUDA)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--solo-epochs", type=int, default=1)
    ap.add_argument("--data-dir")
    ap.add_argument("--subset", type=int)
    ap.add_argument("--preset", action="store_true", help="time the bio-rules preset itself (see above)")
    ap.add_argument("--n-trials", type=int, default=200, help="--preset: trials per study, population run")
    ap.add_argument("--single-trials", type=int, default=2, help="--preset: trials per study, one-trial run")
    ap.add_argument("--n-epochs", type=int, default=10, help="--preset: epochs per trial")
    args = ap.parse_args()
    if args.preset:
        _preset(args)
        return
    dev = core.resolve_device(args.device)
    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir, subset_size=args.subset)
    pops = [int(k) for k in (args.populations or ("256,1024" if dev.type == "cuda" else "8")).split(",")]
    print(f"# fashion-mnist train {len(data.x_train)}, dendritic_simple {MODEL}, batch 128, {dev} "
          f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    rules = RULES[0]
    t0 = time.perf_counter()
    model = core.create_model("dendritic_simple", seed=0, **MODEL)
    torch.manual_seed(0)
    core.BioConverter(core.BioConfig(**{k: v for k, v in rules.items() if k not in _HOOK}))(model)
    hook = core.BioStepHook(**{k: v for k, v in rules.items() if k in _HOOK})
    r = core.train_model(model, data, args.solo_epochs, 2e-3, 0.0, 128, device=dev, seed=0, step_hooks=[hook])
    _sync(dev)
    solo = args.solo_epochs / (time.perf_counter() - t0)
    print(f"{'row':<44} {'model-epochs/s':>14} {'speed-up':>9} {'mean test acc':>14}")
    print(f"{'(s) train_model + BioStepHook, one model':<44} {solo:>14.2f} {1.0:>8.1f}x {r.test_accuracy:>14.4f}",
          flush=True)
    for k in pops:
        configs = [dict(MODEL, seed=i, lr=1e-3 + 2e-3 * (i % 5) / 4, bio=RULES[i % len(RULES)]) for i in range(k)]
        _sync(dev)
        t0 = time.perf_counter()
        res = core.train_population("dendritic_simple", configs, data, args.epochs, 128, device=dev,
                                    population_size=k)
        _sync(dev)
        wall = time.perf_counter() - t0
        ok = [x for x in res if x.status == "completed"]
        rate = sum(len(x.history) for x in res) / wall
        acc = sum(x.test_accuracy for x in ok) / max(1, len(ok))
        print(f"{f'(p) train_population K={k}, bio rules per member':<44} {rate:>14.2f} "
              f"{rate / solo:>8.1f}x {acc:>14.4f}   ({len(ok)}/{k} completed, {wall:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
