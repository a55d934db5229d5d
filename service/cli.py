"""The ``dendro`` command line: serve, worker, search, study, compare."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("dendro")


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _settings(args: argparse.Namespace) -> Any:
    from ._settings import Settings

    overrides = {k: v for k, v in {
        "storage": getattr(args, "storage", None),
        "data_dir": getattr(args, "data_dir", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "device": getattr(args, "device", None),
    }.items() if v is not None}
    return Settings(**overrides)


# -- serve ----------------------------------------------------------------------------------
def _demo_spec(data_dir: Path) -> Any:
    import core
    import studies

    has_fmnist = True
    try:
        core.load_dataset("fashion-mnist", data_dir=data_dir, subset_size=10)
    except core.DatasetNotFoundError:
        has_fmnist = False
    if has_fmnist:
        return studies.StudySpec(
            name="demo-fashion-mnist", model="dendritic_simple", dataset="fashion-mnist",
            max_params=8000, n_trials=40, n_epochs=5, batch_size=256, subset_size=20000,
            search_space={
                "n_neurons": {"type": "int", "low": 5, "high": 20},
                "n_dendrites": {"type": "int", "low": 3, "high": 15},
                "n_dendrite_inputs": {"type": "int", "low": 16, "high": 256, "log": True},
                "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            },
        )
    return studies.StudySpec(
        name="demo-digits", model="dendritic_simple", dataset="digits", max_params=3000,
        n_trials=40, n_epochs=10, batch_size=64,
        search_space={
            "n_neurons": {"type": "int", "low": 4, "high": 16},
            "n_dendrites": {"type": "int", "low": 2, "high": 10},
            "n_dendrite_inputs": {"type": "int", "low": 4, "high": 64, "log": True},
            "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
        },
    )


def _start_workers(n: int, storage: str, device: str, data_dir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for _ in range(n):
        cmd = [sys.executable, "-m", "service.cli", "worker", "--storage", storage, "--device", device,
               "--data-dir", str(data_dir), "--exit-with-parent", str(os.getpid())]
        procs.append(subprocess.Popen(cmd, start_new_session=True))
    return procs


def _stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    import studies

    from ._app import create_app

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.storage_url
    reachable = True
    try:
        # Fail fast on a URL that can never work; the same storage object serves the app.
        studies.open_storage(url, heartbeat_interval=settings.heartbeat_interval,
                             grace_period=settings.grace_period)
    except studies.StorageError as exc:
        if not _unreachable(exc):
            raise
        # A database that is down may come back: serve, and answer 503 until it does.
        reachable = False
        print(f"warning: {exc}; serving anyway, requests answer 503 until it is back", flush=True)
    if args.demo and reachable:
        spec = _demo_spec(settings.data_dir)
        try:
            studies.create_study(spec, url, spec.name, load_if_exists=True)
            print(f"demo study {spec.name!r} ({spec.dataset}, max_params={spec.max_params}, "
                  f"{spec.n_trials} trials) is in {settings.storage_url_redacted}")
        except studies.StudyExistsError as exc:
            print(f"demo study not created: {exc}")
    base = f"http://{settings.host}:{settings.port}"
    print(f"API docs:  {base}/v1/docs\nDashboard: {base}/dashboard\n"
          f"Storage:   {settings.storage_url_redacted}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again; with the
    # default action that would kill this process before the local workers are stopped.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    procs = _start_workers(args.workers, url, settings.device, settings.data_dir) if args.workers else []
    if procs:
        print(f"started {len(procs)} local worker(s) on {settings.device}", flush=True)
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    finally:
        _stop_workers(procs)
        signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _unreachable(exc: BaseException) -> bool:
    """A storage error from a database that did not answer (not from a malformed URL)."""
    import sqlite3

    import sqlalchemy as sa

    return isinstance(exc.__cause__, sa.exc.DBAPIError | sqlite3.Error)


# -- worker ---------------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import Worker, WorkerConfig

    settings = _settings(args)
    population = args.population
    if population is not None and population != "auto" and int(population) > settings.max_population:
        raise CliError(f"--population {population} is over this server's limit max_population="
                       f"{settings.max_population} (DENDRO_MAX_POPULATION); use at most that, or 'auto'")
    worker = Worker(WorkerConfig(
        storage=settings.storage_url,
        device=settings.device,
        studies=[s for s in args.studies.split(",") if s] if args.studies else None,
        max_trials=args.max_trials,
        idle_exit=args.idle_exit,
        data_dir=str(settings.data_dir),
        population=population,
        max_population=settings.max_population,
        heartbeat_interval=settings.heartbeat_interval,
        grace_period=settings.grace_period,
        oom_trials=frozenset(settings.fault_oom_trials),
        parent_pid=args.exit_with_parent,
    ))
    worker.install_signal_handlers()
    if worker.config.oom_trials:
        log.warning("fault injection: trials %s will raise out-of-memory", sorted(worker.config.oom_trials))
    log.info("worker %s on %s, storage %s", worker.config.worker_id, settings.device,
             settings.storage_url_redacted)
    return worker.run()


# -- search and study -----------------------------------------------------------------------
def _read_spec(path: str, overrides: dict[str, Any]) -> Any:
    import studies

    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CliError(f"--spec: no such file {path!r}") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"--spec: {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CliError(f"--spec: {path} must hold a JSON object")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return studies.StudySpec.model_validate(raw)


def cmd_search(args: argparse.Namespace) -> int:
    import studies

    storage = args.storage or studies.default_storage_url(args.out or ".")
    overrides = {"dataset": args.dataset, "max_params": args.max_params, "n_trials": args.n_trials,
                 "n_epochs": args.n_epochs, "subset_size": args.subset_size, "name": args.name}
    if args.spec:
        # Check the spec before the storage is opened: bad input writes nothing.
        spec = _read_spec(args.spec, overrides)
        if spec.name is None:
            spec = spec.model_copy(update={"name": Path(args.spec).stem})
            spec = studies.StudySpec.model_validate(spec.model_dump())
        studies.open_storage(storage)
        study = studies.run_study(spec, storage, spec.name, device=args.device, data_dir=args.data_dir)
        _summary(study)
        if args.out:
            paths = studies.export_study(study, args.out)
            print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    kw = {k: v for k, v in overrides.items() if v is not None and k != "name"}
    studies.get_preset(args.preset)  # an unknown name fails here, before anything is written
    result = studies.run_preset(args.preset, storage=storage, out_dir=args.out, device=args.device,
                                data_dir=args.data_dir, **kw)
    print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str)[:4000])
    return 0


def _summary(study: Any) -> None:
    import studies

    c = studies.progress(study)
    print(f"study {study.study_name}: {c['finished']} finished ({c['complete']} complete, "
          f"{c['pruned']} pruned), {c['infeasible']} infeasible, {c['failed']} failed")
    if len(study.directions) == 1:
        try:
            b = study.best_trial
            print(f"best value {b.value:.4f} (trial {b.number}, {b.user_attrs.get('n_params')} "
                  f"params): {b.params}")
        except ValueError:
            print("no completed trial yet")


def cmd_study(args: argparse.Namespace) -> int:
    import studies

    storage = studies.open_storage(args.storage or studies.default_storage_url("."))
    if args.action == "list":
        rows = storage.get_all_studies()
        if not rows:
            print("no studies")
        for s in rows:
            st = s.user_attrs.get(studies.STATE_ATTR, "-")
            n = len(storage.get_all_trials(s._study_id, deepcopy=False))
            print(f"{s.study_name:32s} {st:8s} {n:6d} trials")
        return 0
    if not args.name:
        raise CliError(f"study {args.action}: give the study name")
    study, _ = studies.load_study(args.name, storage)
    if args.action == "show":
        _summary(study)
        return 0
    out = args.out or "."
    try:
        # Each file is written whole or not at all (studies.export_study writes a temporary
        # file and renames it): a full or read-only disk leaves no partial file behind.
        paths = studies.export_study(study, out, formats=tuple(args.format.split(",")))
    except OSError as exc:
        where = exc.filename or out
        raise CliError(f"cannot write the export to {where}: {exc.strerror or exc}; "
                       "no partially written file was left") from None
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# -- compare (the quick dendritic-vs-vanilla job) -------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    import core

    data = core.load_dataset(args.dataset, data_dir=args.data_dir, subset_size=args.subset_size)
    io = core.data_params("dendritic_simple", data.input_shape, data.n_classes)
    k = min(32, data.in_dim)
    models = [
        (core.create_model("dendritic_simple", seed=0, n_neurons=10, n_dendrites=23,
                           n_dendrite_inputs=k, **io), None, "dendritic (resampling)"),
        (core.create_model("dendritic_simple", seed=0, n_neurons=10, n_dendrites=23,
                           n_dendrite_inputs=k, synaptic_resampling=False, **io), None, "dendritic (static)"),
        (core.create_model("vanilla_mlp", seed=0, hidden_dim=max(4, round(core.count_parameters(
            core.create_model("dendritic_simple", n_neurons=10, n_dendrites=23, n_dendrite_inputs=k, **io))
            / (data.in_dim + 1 + data.n_classes))), **io), None, "vanilla MLP (same budget)"),
    ]
    print(f"{args.dataset}: {data.sizes()} on {core.resolve_device(args.device)}")
    core.compare_models(models, data, n_epochs=args.epochs, batch_size=args.batch_size,
                        device=args.device, verbose=True)
    return 0


def _population_arg(value: str) -> str:
    v = value.strip().lower()
    if v == "auto" or (v.isdigit() and int(v) >= 1):
        return v
    raise argparse.ArgumentTypeError(f"--population must be a positive integer or 'auto', got {value!r}")


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dendro", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the REST API and dashboard (and local workers)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--storage", help="database URL (default: SQLite in the data dir)")
    s.add_argument("--data-dir")
    s.add_argument("--workers", type=int, default=0, help="local worker processes to start")
    s.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    s.add_argument("--demo", action="store_true", help="create a demo study if it is missing")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="pull and train trials from the storage")
    w.add_argument("--storage")
    w.add_argument("--data-dir")
    w.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    w.add_argument("--studies", help="comma-separated study names to serve (default: all)")
    w.add_argument("--max-trials", type=int)
    w.add_argument("--idle-exit", type=float, help="exit after this many idle seconds")
    w.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    w.add_argument("--population", type=_population_arg,
                   help="train K trials of a study at once on the device: an integer or 'auto'")
    w.set_defaults(func=cmd_worker)

    se = sub.add_parser("search", help="run a whole search in this process")
    g = se.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="quick-prototype, optimize-budget, compare-architectures, thorough, "
                   "bio-rules, dendrite-growth, diru-vs-lstm")
    g.add_argument("--spec", help="a study spec JSON file")
    se.add_argument("--name")
    se.add_argument("--dataset")
    se.add_argument("--max-params", type=int)
    se.add_argument("--n-trials", type=int)
    se.add_argument("--n-epochs", type=int)
    se.add_argument("--subset-size", type=int)
    se.add_argument("--storage")
    se.add_argument("--out", help="directory for JSON, CSV and HTML results")
    se.add_argument("--device")
    se.add_argument("--data-dir")
    se.set_defaults(func=cmd_search)

    st = sub.add_parser("study", help="list, show or export studies")
    st.add_argument("action", choices=["list", "show", "export"])
    st.add_argument("name", nargs="?")
    st.add_argument("--storage")
    st.add_argument("--out")
    st.add_argument("--format", default="json,csv,html")
    st.set_defaults(func=cmd_study)

    c = sub.add_parser("compare", help="dendritic vs vanilla on one dataset (quick)")
    c.add_argument("--dataset", default="digits")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--subset-size", type=int)
    c.add_argument("--device")
    c.add_argument("--data-dir")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("optuna").setLevel(logging.WARNING)
    import pydantic

    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"dendro: error: {exc}", file=sys.stderr)
    except pydantic.ValidationError as exc:
        from ._errors import spec_error_items

        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}"
                         for e in spec_error_items(exc.errors()))
        print(f"dendro: error: invalid spec: {errs}", file=sys.stderr)
    except Exception as exc:  # user-facing errors of the layers below
        import core
        import studies

        if isinstance(exc, studies.StudiesError | core.CoreError | ValueError):
            print(f"dendro: error: {exc}", file=sys.stderr)
        else:
            raise
    return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
