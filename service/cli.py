"""The ``dendro`` command line: serve, worker, search, study, compare."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("dendro")


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _settings(args: argparse.Namespace | None = None) -> Any:
    import pydantic

    from ._settings import Settings

    overrides = {k: v for k, v in {
        "storage": getattr(args, "storage", None),
        "data_dir": getattr(args, "data_dir", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "device": getattr(args, "device", None),
    }.items() if v is not None}
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        errs = "; ".join(f"DENDRO_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise CliError(f"invalid setting: {errs}") from None


def _load_plugins(args: argparse.Namespace) -> list[str]:
    """Import DENDRO_PLUGINS, --plugin and the ``dendro.plugins`` entry points; the names given
    (not the entry points, which every process finds itself) for the local workers."""
    from ._plugins import PluginError, load_plugins

    names = list(dict.fromkeys([*_settings().plugins, *(getattr(args, "plugin", None) or [])]))
    try:
        load_plugins(names)
    except PluginError as exc:
        raise CliError(str(exc)) from None
    return names


def _storage_source(args: argparse.Namespace, settings: Any) -> str:
    if getattr(args, "storage", None):
        return "--storage"
    if settings.storage:
        return "DENDRO_STORAGE"
    return f"the data dir {settings.data_dir}"


def _open_storage(args: argparse.Namespace, settings: Any, *, create: bool = True,
                  unreachable_ok: bool = False, always_say: bool = False) -> tuple[str, Any]:
    """The storage URL every command resolves the same way, opened; says which one on stderr.

    ``--storage``, then ``DENDRO_STORAGE``, then ``dendro.db`` in the data dir (``--data-dir``,
    then ``DENDRO_DATA_DIR``, then ``.data``). A URL that can never work (malformed, an
    unknown or uninstalled driver, a SQLite file whose folder does not exist) raises, one line,
    creating nothing. The data dir is created only for the default database, and only when
    ``create``: commands that read (``study ...``) say there is no database instead.
    ``unreachable_ok``: a database that does not answer is reported and None returned for the
    storage (``serve`` answers 503 until it is back; a worker retries). The line that names the
    storage is printed when it was not given with ``--storage`` (the user's own choice needs no
    echo, and a command's error stays its only line), and always with ``always_say`` (the
    long-running ``serve`` and ``worker``, whose output is a log).
    """
    import studies

    url = settings.storage_url
    source = _storage_source(args, settings)
    if settings.storage_default:
        db = settings.data_dir.resolve() / "dendro.db"
        if not create and not db.exists():
            raise CliError(f"no database at {db} (the default: the data dir's dendro.db); give "
                           "--storage URL, set DENDRO_STORAGE, or --data-dir DIR of an existing one")
        if create:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
    storage = None
    try:
        storage = studies.open_storage(url, heartbeat_interval=settings.heartbeat_interval,
                                       grace_period=settings.grace_period)
    except studies.StorageError as exc:
        if not (unreachable_ok and _unreachable(exc)):
            raise
        print(f"dendro: storage {settings.storage_url_redacted} (from {source}) is unreachable: {exc}",
              file=sys.stderr, flush=True)
        return url, None
    if always_say or source != "--storage":
        print(f"dendro: storage {settings.storage_url_redacted} (from {source})", file=sys.stderr, flush=True)
    return url, storage


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


def _worker_cmd(storage: str, device: str, data_dir: Path, plugins: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "service.cli", "worker", "--storage", storage, "--device", device,
           "--data-dir", str(data_dir), "--exit-with-parent", str(os.getpid())]
    for name in plugins:
        cmd += ["--plugin", name]
    return cmd


def _stop_workers(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
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


class LocalWorkers:
    """The worker processes ``dendro serve --workers N`` runs, restarted when one dies.

    A dead worker is started again after ``min_delay`` seconds; each death within a minute of
    its start doubles the next delay, up to ``max_delay`` (a worker that cannot start does not
    spin). Nothing is restarted once ``stop`` is called.
    """

    #: a worker that ran this long before dying starts the backoff afresh
    HEALTHY_AFTER = 60.0

    def __init__(self, cmd: list[str], n: int, min_delay: float = 1.0, max_delay: float = 60.0) -> None:
        self.cmd, self.n = cmd, n
        self.min_delay, self.max_delay = min_delay, max(min_delay, max_delay)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started: list[float] = []
        self.delays: list[float] = []
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="local-workers", daemon=True)

    def start(self) -> None:
        with self._lock:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen(self.cmd, start_new_session=True))
                self.started.append(time.monotonic())
                self.delays.append(self.min_delay)
        self._thread.start()

    def _watch(self) -> None:
        due: dict[int, float] = {}  # slot -> when to restart it
        while not self._stopping.wait(0.2):
            now = time.monotonic()
            with self._lock:
                for i, p in enumerate(self.procs):
                    if p.poll() is None or i in due and now < due[i]:
                        continue
                    if i not in due:
                        if now - self.started[i] >= self.HEALTHY_AFTER:
                            self.delays[i] = self.min_delay
                        delay = self.delays[i]
                        self.delays[i] = min(self.max_delay, delay * 2)
                        due[i] = now + delay
                        log.warning("local worker %d (pid %d) exited with code %s; restarting it in %.0f s",
                                    i, p.pid, p.returncode, delay)
                        continue
                    if self._stopping.is_set():
                        return
                    del due[i]
                    self.procs[i] = subprocess.Popen(self.cmd, start_new_session=True)
                    self.started[i] = now
                    self.restarts += 1
                    log.warning("local worker %d restarted (pid %d)", i, self.procs[i].pid)

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            _stop_workers(self.procs, timeout)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    import studies

    from ._app import create_app

    settings = _settings(args)
    url, storage = _open_storage(args, settings, unreachable_ok=True, always_say=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # datasets and exports live there
    reachable = storage is not None
    if not reachable:
        # A database that is down may come back: serve, and answer 503 until it does.
        print("warning: serving anyway, requests answer 503 until the database is back", flush=True)
    if args.demo and reachable:
        spec = _demo_spec(settings.data_dir)
        try:
            studies.create_study(spec, url, spec.name, load_if_exists=True)
            print(f"demo study {spec.name!r} ({spec.dataset}, max_params={spec.max_params}, "
                  f"{spec.n_trials} trials) is in {settings.storage_url_redacted}")
        except studies.StudyExistsError as exc:
            print(f"demo study not created: {exc}")
    base = f"http://{settings.host}:{settings.port}"
    print(f"Page:      {base}/\nAPI docs:  {base}/v1/docs\nDashboard: {base}/dashboard\n"
          f"Storage:   {settings.storage_url_redacted}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again; with the
    # default action that would kill this process before the local workers are stopped.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    workers = None
    if args.workers:
        workers = LocalWorkers(_worker_cmd(url, settings.device, settings.data_dir, args.plugins_loaded),
                               args.workers, settings.worker_restart_min, settings.worker_restart_max)
        workers.start()
        print(f"started {args.workers} local worker(s) on {settings.device}", flush=True)
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    finally:
        if workers is not None:
            workers.stop()
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
    # A URL that can never work exits here (2); a database that does not answer yet is
    # retried by the loop with backoff, as one that goes away later is.
    url, _ = _open_storage(args, settings, unreachable_ok=True, always_say=True)
    worker = Worker(WorkerConfig(
        storage=url,
        device=settings.device,
        studies=[s for s in args.studies.split(",") if s] if args.studies else None,
        max_trials=args.max_trials,
        idle_exit=args.idle_exit,
        poll_interval=args.poll_interval,
        data_dir=str(settings.data_dir),
        population=population,
        max_population=settings.max_population,
        heartbeat_interval=settings.heartbeat_interval,
        grace_period=settings.grace_period,
        oom_trials=frozenset(settings.fault_oom_trials),
        epoch_seconds=settings.fault_epoch_seconds,
        parent_pid=args.exit_with_parent,
    ))
    worker.install_signal_handlers()
    if worker.config.oom_trials:
        log.warning("fault injection: trials %s will raise out-of-memory", sorted(worker.config.oom_trials))
    if worker.config.epoch_seconds:
        log.warning("fault injection: every epoch takes at least %.2f s more", worker.config.epoch_seconds)
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

    settings = _settings(args)
    overrides = {"dataset": args.dataset, "max_params": args.max_params, "n_trials": args.n_trials,
                 "n_epochs": args.n_epochs, "subset_size": args.subset_size, "name": args.name}
    data_dir = str(settings.data_dir)
    population = _population_value(args.population)
    if args.spec:
        # Check the spec before the storage is opened: bad input writes nothing.
        spec = _read_spec(args.spec, overrides)
        if spec.name is None:
            spec = spec.model_copy(update={"name": Path(args.spec).stem})
            spec = studies.StudySpec.model_validate(spec.model_dump())
        _, storage = _open_storage(args, settings)
        study = studies.run_study(spec, storage, spec.name, device=args.device, data_dir=data_dir,
                                  population=population)
        _summary(study)
        if args.out:
            paths = studies.export_study(study, args.out)
            print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    kw = {k: v for k, v in overrides.items() if v is not None and k != "name"}
    preset = studies.get_preset(args.preset)  # an unknown name fails here, before anything is written
    if population is not None:
        if "population" not in inspect.signature(preset.function).parameters:
            raise studies.SpecError("population", f"preset {preset.name} trains one trial at a time; "
                                    "drop --population")
        kw["population"] = population
    url, _ = _open_storage(args, settings)
    result = studies.run_preset(args.preset, storage=url, out_dir=args.out, device=args.device,
                                data_dir=data_dir, **kw)
    text = result if isinstance(result, str) else json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
        print(f"wrote the results of preset {args.preset} to {args.json}")
    else:
        print(text)  # whole: a reader pipes it to jq
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


def _show(study: Any, spec: Any) -> None:
    """``dendro study show``: what the study is, where it stands, what it found, what went wrong."""
    import studies

    attrs = study.user_attrs
    c = studies.progress(study)
    state = studies.state_of(attrs)
    families = ", ".join(spec.families)
    budget = f"max_params={spec.max_params}" if spec.max_params is not None else "no budget"
    print(f"study {study.study_name}: {state}")
    print(f"  family:    {families}")
    print(f"  dataset:   {spec.dataset}")
    print(f"  budget:    {budget}")
    print(f"  objective: {', '.join(f'{o} ({d})' for o, d in zip(spec.objectives, spec.directions, strict=True))}")
    print(f"  trials:    {c['finished']} of {spec.n_trials} finished ({c['complete']} complete, "
          f"{c['pruned']} pruned), {c['running']} running, {c['waiting']} waiting, "
          f"{c['infeasible']} infeasible, {c['failed']} failed")
    done = [t for t in studies.trained_trials(study, complete_only=True) if t.values is not None]
    if not done:
        print("  best:      no completed trial yet")
    elif len(study.directions) == 1:
        b = studies.best_trial(study)
        assert b is not None
        print(f"  best:      trial {b.number}: {spec.objectives[0]}={b.values[0]:.4f}, "
              f"{b.user_attrs.get('n_params')} params, params {json.dumps(b.params)}")
    else:
        front = sorted(study.best_trials, key=lambda t: t.number)
        print(f"  pareto front ({len(front)} trials):")
        for t in front:
            vals = ", ".join(f"{o}={v:.4g}" for o, v in zip(spec.objectives, t.values, strict=True))
            print(f"    trial {t.number}: {vals}, params {json.dumps(t.params)}")
    error = attrs.get(studies.ERROR_ATTR)
    if error:
        print(f"  error:     {error}")


def cmd_study(args: argparse.Namespace) -> int:
    import pydantic

    import studies

    settings = _settings(args)
    if args.action in ("show", "export", "extend", "finalize") and not args.name:
        raise CliError(f"study {args.action}: give the study name")
    if args.action == "extend" and args.n_trials is None and args.timeout is None:
        raise CliError("study extend: give --n-trials N (the new total) and/or --timeout SECONDS")
    _, storage = _open_storage(args, settings, create=False)
    if args.action == "list":
        rows = storage.get_all_studies()
        if not rows:
            print("no studies")
        for s in rows:
            st = s.user_attrs.get(studies.STATE_ATTR, "-")
            n = len(storage.get_all_trials(s._study_id, deepcopy=False))
            print(f"{s.study_name:32s} {st:8s} {n:6d} trials")
        return 0
    try:
        study, spec = studies.load_study(args.name, storage)
    except pydantic.ValidationError as exc:  # the stored spec names what this process lacks
        from ._errors import spec_error_items

        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}"
                         for e in spec_error_items(exc.errors()))
        raise CliError(f"study {args.name}: its stored spec does not load here ({errs}); if a plugin "
                       "registers its family or dataset, give --plugin MODULE or set DENDRO_PLUGINS") from None
    if args.action == "show":
        _show(study, spec)
        return 0
    if args.action == "finalize":
        return _finalize(args, study, settings)
    if args.action == "extend":
        state = studies.extend_study(study, n_trials=args.n_trials, timeout=args.timeout)
        spec = studies.study_spec(study)
        print(f"study {args.name}: n_trials {spec.n_trials}"
              + (f", timeout {spec.timeout:g} s" if spec.timeout is not None else "") + f"; {state}")
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


def _final_line(final: dict[str, Any]) -> str:
    if final.get("state") != "done":
        return f"finalize {final.get('state')}" + (f": {final['reason']}" if final.get("reason") else "")
    if final.get("test_accuracy_mean") is not None:
        score = (f"test {100 * final['test_accuracy_mean']:.2f}% \u00b1 {100 * (final['test_accuracy_std'] or 0):.2f}"
                 f" (val {100 * final['val_accuracy_mean']:.2f}%)")
    else:
        score = f"test loss {final.get('test_loss_mean')} \u00b1 {final.get('test_loss_std')}"
    n = final.get("n_params")
    return (f"final: {score}, trial {final['trial']}, {n:,} params, mean of {final['seeds']} seeds x "
            f"{final['n_epochs']} epochs over the top {final['top_n']}" if n is not None else score)


def _finalize(args: argparse.Namespace, study: Any, settings: Any) -> int:
    """study finalize: store the request for a worker (or run it here with --local)."""
    import studies

    request = studies.request_finalize(study, args.top_n, args.seeds, args.n_epochs)
    if args.local:
        final = studies.run_finalize(study, device=settings.device, data_dir=str(settings.data_dir),
                                     worker=f"cli:{os.getpid()}", request=None)
        print(_final_line(final))
        print(json.dumps(final, indent=2))
        return 0
    print(f"study {study.study_name}: finalize queued (top {request['top_n']} x {request['seeds']} seeds x "
          f"{request['n_epochs']} epochs); a worker runs it")
    if not args.wait:
        return 0
    while True:
        r = study._storage.get_study_user_attrs(study._study_id).get(studies.FINALIZE_ATTR) or {}
        if r.get("state") in ("done", "error"):
            break
        time.sleep(2.0)
    final = studies.final_of(study._storage.get_study_user_attrs(study._study_id)) or {}
    print(_final_line(final))
    return 0 if final.get("state") == "done" else 1


# -- compare (the quick dendritic-vs-vanilla job) -------------------------------------------
def _resampling_events(model: Any) -> tuple[int, int]:
    """(resampling steps, connections swapped) of a model's dendritic layers, summed over layers."""
    import core

    events = swapped = 0
    for m in model.modules():
        if isinstance(m, core.DendriticLayer):
            per_step = m.n_to_resample() * m.weight.shape[0]
            swapped += int(m.n_swapped)
            events += int(m.n_swapped) // per_step if m.synaptic_resampling and per_step > 0 else 0
    return events, swapped


def cmd_compare(args: argparse.Namespace) -> int:
    import core

    data = core.load_dataset(args.dataset, data_dir=args.data_dir, subset_size=args.subset_size)
    io = core.data_params("dendritic_simple", data.input_shape, data.n_classes)
    k = min(32, data.in_dim)
    arch = {"n_neurons": 10, "n_dendrites": 23, "n_dendrite_inputs": k, **io}
    # Resampling every `steps_to_resample` backward passes: the default (fewer steps than
    # the seed's 128) lets it happen several times in a quick run on digits.
    resampling = {"steps_to_resample": args.steps_to_resample, "percentage_resample": args.percentage_resample}
    models = [
        (core.create_model("dendritic_simple", seed=0, **arch, **resampling), None, "dendritic (resampling)"),
        (core.create_model("dendritic_simple", seed=0, synaptic_resampling=False, **arch), None,
         "dendritic (static)"),
        (core.create_model("vanilla_mlp", seed=0, hidden_dim=max(4, round(core.count_parameters(
            core.create_model("dendritic_simple", **arch)) / (data.in_dim + 1 + data.n_classes))), **io),
         None, "vanilla MLP (same budget)"),
    ]
    print(f"{args.dataset}: {data.sizes()} on {core.resolve_device(args.device)}; {args.epochs} epochs, "
          f"batch {args.batch_size}, resampling {args.percentage_resample:g} of each dendrite's inputs "
          f"every {args.steps_to_resample} steps")
    core.compare_models(models, data, n_epochs=args.epochs, batch_size=args.batch_size,
                        device=args.device, verbose=True)
    for model, _, label in models[:2]:
        events, swapped = _resampling_events(model)
        print(f"{label:>26s}: {events} resampling events ({swapped} connections swapped)")
    if _resampling_events(models[0][0])[0] == 0:
        print("no resampling happened, so the two dendritic rows are the same model: use more "
              "--epochs or a smaller --steps-to-resample")
    return 0


def _population_arg(value: str) -> str:
    v = value.strip().lower()
    if v == "auto" or (v.isdigit() and int(v) >= 1):
        return v
    raise argparse.ArgumentTypeError(f"--population must be a positive integer or 'auto', got {value!r}")


def _seconds_arg(value: str) -> float:
    """A positive number of seconds (``--poll-interval``)."""
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"--poll-interval must be a positive number of seconds, got {value!r}")
    return v


def _population_value(value: str | None) -> int | str | None:
    """``--population`` as the studies API takes it: None, "auto" or an int (one line, exit 2, if bad)."""
    if value is None:
        return None
    try:
        v = _population_arg(value)
    except argparse.ArgumentTypeError as e:
        raise CliError(str(e)) from None
    return v if v == "auto" else int(v)


# -- parser ---------------------------------------------------------------------------------
_STORAGE_HELP = "database URL (default: DENDRO_STORAGE, else dendro.db in the data dir)"


def _plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable; also DENDRO_PLUGINS and the dendro.plugins "
                   "entry points): it registers model families or datasets")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dendro", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the REST API and dashboard (and local workers)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--storage", help=_STORAGE_HELP)
    s.add_argument("--data-dir")
    s.add_argument("--workers", type=int, default=0, help="local worker processes to start")
    s.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    s.add_argument("--demo", action="store_true", help="create a demo study if it is missing")
    _plugin_arg(s)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="pull and train trials from the storage")
    w.add_argument("--storage", help=_STORAGE_HELP)
    w.add_argument("--data-dir")
    w.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    w.add_argument("--studies", help="comma-separated study names to serve (default: all)")
    w.add_argument("--max-trials", type=int)
    w.add_argument("--idle-exit", type=float, help="exit after this many idle seconds")
    w.add_argument("--poll-interval", type=_seconds_arg, default=1.0, metavar="S",
                   help="seconds an idle worker waits before it looks for work again (default 1)")
    w.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    w.add_argument("--population", type=_population_arg,
                   help="train K trials of a study at once on the device: an integer or 'auto'")
    _plugin_arg(w)
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
    se.add_argument("--storage", help=_STORAGE_HELP)
    se.add_argument("--out", help="directory for JSON, CSV and HTML results (the database stays "
                    "where --storage says)")
    se.add_argument("--json", metavar="FILE", help="write a preset's JSON summary to FILE instead of stdout")
    se.add_argument("--device")
    se.add_argument("--population", help="train K trials at once where the study allows: an integer or "
                    "'auto' (default: one at a time)")
    se.add_argument("--data-dir", help="datasets, and the default database (default: DENDRO_DATA_DIR or .data)")
    _plugin_arg(se)
    se.set_defaults(func=cmd_search)

    st = sub.add_parser("study", help="list, show, export or extend studies")
    st.add_argument("action", choices=["list", "show", "export", "extend", "finalize"])
    st.add_argument("name", nargs="?")
    st.add_argument("--storage", help=_STORAGE_HELP)
    st.add_argument("--data-dir", help="where the default database is (default: DENDRO_DATA_DIR or .data)")
    st.add_argument("--out")
    st.add_argument("--format", default="json,csv,html")
    st.add_argument("--n-trials", type=int, help="extend: the new total number of trials")
    st.add_argument("--timeout", type=float, help="extend: the new whole-study timeout in seconds")
    st.add_argument("--top-n", type=int, default=3, help="finalize: re-train this many best trials")
    st.add_argument("--seeds", type=int, default=3, help="finalize: fresh seeds per trial")
    st.add_argument("--n-epochs", type=int, help="finalize: epochs per run (default: the study's)")
    st.add_argument("--wait", action="store_true", help="finalize: wait for a worker's answer and print it")
    st.add_argument("--local", action="store_true", help="finalize: run it in this process, not by a worker")
    st.add_argument("--device", help="finalize --local: cpu, cuda, cuda:N or auto")
    _plugin_arg(st)
    st.set_defaults(func=cmd_study)

    c = sub.add_parser("compare", help="dendritic vs vanilla on one dataset (quick)")
    c.add_argument("--dataset", default="digits")
    c.add_argument("--epochs", type=int, default=15)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--steps-to-resample", type=int, default=32,
                   help="backward passes between resampling steps (the seed's default is 128)")
    c.add_argument("--percentage-resample", type=float, default=0.25)
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
        if hasattr(args, "plugin"):
            args.plugins_loaded = _load_plugins(args)
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
