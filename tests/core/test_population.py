"""train_population: every member trains exactly as train_model would train it alone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.nn import functional as F

import core
from core import _population
from core._population import POPULATION_FAMILIES, _Population, train_population

EPOCHS = 2
BATCH = 128
METRICS = ("train_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy")


@pytest.fixture(scope="module")
def data() -> core.Dataset:
    return core.load_dataset("digits")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: intra-op threads only wait on each other on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _solo(
    family: str, config: dict[str, Any], data: core.Dataset, n_epochs: int = EPOCHS,
    stop_at: int | None = None, device: str = "cpu",
) -> core.TrainResult:
    cfg = dict(config)
    lr, wd, seed = cfg.pop("lr", 1e-3), cfg.pop("weight_decay", 0.0), cfg.pop("seed")
    model = core.create_model(family, seed=seed, in_dim=data.in_dim, n_classes=data.n_classes, **cfg)
    on_epoch = None if stop_at is None else (lambda epoch, _m: epoch >= stop_at)
    result = core.train_model(model, data, n_epochs, lr, wd, BATCH, device=device, seed=seed,
                              on_epoch=on_epoch)
    result.state_dict = model.state_dict()  # type: ignore[attr-defined]
    return result


def _assert_same(got: core.TrainResult, want: core.TrainResult, data: core.Dataset) -> None:
    assert got.status == want.status
    assert got.seed == want.seed
    assert got.n_params == want.n_params
    assert got.epochs_run == want.epochs_run
    sizes = {"train": len(data.x_train), "val": len(data.x_val), "test": len(data.x_test)}
    for g, w in zip(got.history, want.history, strict=True):
        assert g["epoch"] == w["epoch"]
        for key in METRICS:
            if key.endswith("accuracy"):  # a prediction may flip on a rounding difference
                assert g[key] == pytest.approx(w[key], abs=1.5 / sizes[key.split("_")[0]]), key
            else:
                assert g[key] == pytest.approx(w[key], rel=1e-4), key
    if want.status != "diverged":  # the trained weights, and the connections resampling chose
        got_sd, want_sd = got.state_dict, want.state_dict  # type: ignore[attr-defined]
        assert list(got_sd) == list(want_sd)
        for name, value in want_sd.items():
            if value.dtype.is_floating_point:
                torch.testing.assert_close(got_sd[name], value, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(got_sd[name], value), name


def _check_family(family: str, configs: list[dict[str, Any]], data: core.Dataset) -> None:
    results = train_population(family, configs, data, EPOCHS, BATCH, device="cpu")
    assert len(results) == len(configs)
    for config, got in zip(configs, results, strict=True):
        assert got.status == "completed"
        _assert_same(got, _solo(family, config, data), data)


def test_dendritic_simple_members_of_different_sizes_match_train_model(data: core.Dataset) -> None:
    _check_family("dendritic_simple", [
        # resampling every few steps, so that it happens several times in two epochs
        dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, steps_to_resample=4, lr=3e-3, seed=1),
        dict(n_neurons=6, n_dendrites=2, n_dendrite_inputs=24, steps_to_resample=7,
             percentage_resample=0.5, lr=1e-2, weight_decay=1e-3, seed=2),
        dict(n_neurons=3, n_dendrites=5, n_dendrite_inputs=8, synaptic_resampling=False, seed=3),
        dict(n_neurons=5, n_dendrites=4, n_dendrite_inputs=64, steps_to_resample=3, seed=4),
    ], data)


def test_members_over_more_than_2048_inputs_resample_as_train_model() -> None:
    """Past 2,048 inputs the resampling scores are int64 (core._layers.input_scores): members of
    different sizes still pick what train_model's layer picks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2500, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    wide = core.Dataset("wide", x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:], n_classes=2)
    _check_family("dendritic_simple", [
        dict(n_neurons=3, n_dendrites=2, n_dendrite_inputs=12, steps_to_resample=1, seed=1),
        dict(n_neurons=2, n_dendrites=3, n_dendrite_inputs=20, steps_to_resample=2,
             percentage_resample=0.5, seed=2),
    ], wide)


def test_soma_disabled_members_match_train_model(data: core.Dataset) -> None:
    _check_family("soma_disabled", [
        dict(n_neurons=2, n_dendrites=5, n_dendrite_inputs=16, hidden_dim=8, steps_to_resample=6,
             seed=5),
        dict(n_neurons=1, n_dendrites=7, n_dendrite_inputs=20, hidden_dim=12, steps_to_resample=3,
             lr=5e-3, seed=6),
    ], data)


def test_dendritic_with_hidden_mixing_soma_on_and_off_matches_train_model(
    data: core.Dataset,
) -> None:
    _check_family("dendritic_with_hidden", [
        dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, hidden_dim=8, steps_to_resample=6,
             seed=7),
        dict(n_neurons=6, n_dendrites=2, n_dendrite_inputs=12, hidden_dim=5, soma_enabled=False,
             steps_to_resample=4, lr=5e-3, seed=8),
    ], data)


def test_vanilla_mlp_members_of_different_depth_match_train_model(data: core.Dataset) -> None:
    _check_family("vanilla_mlp", [
        dict(hidden_dim=16, n_hidden_layers=1, seed=9),
        dict(hidden_dim=8, n_hidden_layers=3, lr=4e-3, weight_decay=1e-2, seed=10),
        dict(hidden_dim=12, n_hidden_layers=2, seed=11),
    ], data)


def test_member_seed_defaults_to_population_seed_plus_index(data: core.Dataset) -> None:
    # equal sizes: the population needs no padding (its plain-stacking path)
    cfg = dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, steps_to_resample=4)
    results = train_population("dendritic_simple", [cfg, cfg], data, EPOCHS, BATCH, device="cpu",
                               seed=40)
    assert [r.seed for r in results] == [40, 41]
    for i, r in enumerate(results):
        _assert_same(r, _solo("dendritic_simple", {**cfg, "seed": 40 + i}, data), data)


def test_padding_holds_zeros_and_receives_no_gradient(data: core.Dataset) -> None:
    configs = [
        dict(n_neurons=2, n_dendrites=2, n_dendrite_inputs=8, hidden_dim=3, steps_to_resample=2,
             lr=1e-2, weight_decay=1e-2, seed=1),
        dict(n_neurons=5, n_dendrites=4, n_dendrite_inputs=32, hidden_dim=9, soma_enabled=False,
             steps_to_resample=3, seed=2),
    ]
    checked = []
    pop: _Population

    def inspect(index: int, epoch: int, metrics: dict[str, Any]) -> None:
        stack = pop.stack
        assert stack is not None
        pad = ~stack.real_mask()
        for buf in (stack.p, stack.m, stack.v):
            assert torch.count_nonzero(buf[pad]) == 0
        assert stack.kmask is not None and (stack.kmask.sum() == 2 * 2 * 8 + 5 * 4 * 32)
        xb = data.x_train[:16].expand(stack.K, 16, -1)
        out = stack.logits(xb, shared=False)
        loss = F.cross_entropy(out.reshape(-1, 10), data.y_train[:16].repeat(stack.K))
        grads = torch.autograd.grad(loss, list(stack.views.values()))
        flat = torch.cat([g.reshape(stack.K, -1) for g in grads], dim=1)
        flat = F.pad(flat, (0, stack.p.shape[1] - flat.shape[1]))  # a row's tail: _Dims.stride
        assert torch.count_nonzero(flat[pad]) == 0
        assert torch.count_nonzero(flat[~pad]) > 0
        checked.append(index)

    pop = _Population("dendritic_with_hidden", configs, data, EPOCHS, BATCH, torch.device("cpu"),
                      0, 2, inspect, None)
    results = pop.run()
    assert len(checked) == 2 * EPOCHS
    _assert_same(results[0], _solo("dendritic_with_hidden", configs[0], data), data)


def test_iterator_of_seven_configs_with_three_slots_refills_each_freed_slot(
    data: core.Dataset,
) -> None:
    n_epochs = 3
    stop_at = [1, 3, 2, 1, 2, 3, 1]  # pruning at different epochs frees slots at different times
    configs = [
        dict(n_neurons=3 + i % 3, n_dendrites=2 + i % 2, n_dendrite_inputs=12 + 4 * i,
             steps_to_resample=3 + i, seed=100 + i)
        for i in range(7)
    ]
    finished: list[int] = []
    live_when_read: list[int] = []

    def lazily() -> Iterator[dict[str, Any]]:
        for i, cfg in enumerate(configs):
            live_when_read.append(i - len(finished))  # members running when this one is read
            yield cfg

    def prune(index: int, epoch: int, metrics: dict[str, Any]) -> bool:
        return epoch >= stop_at[index] < n_epochs

    results = train_population(
        "dendritic_simple", lazily(), data, n_epochs, BATCH, device="cpu", on_epoch=prune,
        population_size=3, on_result=lambda index, result: finished.append(index),
    )
    assert len(results) == 7
    assert [r.seed for r in results] == [100 + i for i in range(7)]
    # read only when a slot is free: at the epoch ends, members 0 | 3, 2 | 4, 6 | 1, 5 end
    assert live_when_read == [0, 1, 2, 2, 1, 2, 2]
    assert sorted(finished) == list(range(7))
    for i, r in enumerate(results):
        assert r.epochs_run == stop_at[i]
        assert r.status == ("completed" if stop_at[i] == n_epochs else "stopped")
    # members that joined late (different epoch counters, steps and resampling times)
    for i in (4, 5, 6):
        stop = stop_at[i] if stop_at[i] < n_epochs else None
        _assert_same(results[i], _solo("dendritic_simple", configs[i], data, n_epochs, stop), data)


@pytest.mark.parametrize("ahead", [(), ("cpu",)])
def test_non_finite_member_diverges_alone(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch, ahead: tuple[str, ...],
) -> None:
    monkeypatch.setattr(_population, "_AHEAD_ON", ahead)  # ("cpu",): epoch 2 queued ahead, as on CUDA
    configs = [
        dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, steps_to_resample=5, seed=1),
        dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, lr=1e12, seed=2),
        dict(n_neurons=5, n_dendrites=2, n_dendrite_inputs=20, steps_to_resample=4, seed=3),
    ]
    ended: list[tuple[int, str]] = []
    stats: dict[str, Any] = {}
    results = train_population("dendritic_simple", configs, data, EPOCHS, BATCH, device="cpu",
                               on_result=lambda i, r: ended.append((i, r.status)), stats=stats)
    # ahead: the second epoch was queued before the first was read back, then undone
    assert stats["run_ahead"] == len(ahead)
    assert results[1].status == "diverged"
    assert results[1].epochs_run == 0 and "non-finite" in (results[1].error or "")
    assert ended[0] == (1, "diverged")  # reported as soon as it ended, before the others
    for i in (0, 2):
        _assert_same(results[i], _solo("dendritic_simple", configs[i], data), data)


def test_out_of_memory_halves_population_and_loses_no_member(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    configs = [
        dict(n_neurons=3 + i, n_dendrites=2, n_dendrite_inputs=10 + 3 * i, steps_to_resample=3 + i,
             seed=i)
        for i in range(5)
    ]
    sizes: list[int] = []

    def fault(k: int) -> None:
        sizes.append(k)
        if len(sizes) == 5:  # mid-epoch, after some steps changed the weights
            raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(_population, "_step_hook", fault)
    results = train_population("dendritic_simple", configs, data, EPOCHS, BATCH, device="cpu",
                               population_size=4)
    monkeypatch.setattr(_population, "_step_hook", None)
    assert sizes[0] == 4 and max(sizes[5:]) == 2
    assert [r.status for r in results] == ["completed"] * 5
    for cfg, r in zip(configs, results, strict=True):
        _assert_same(r, _solo("dendritic_simple", cfg, data), data)


CONFIGS_AHEAD = [
    dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, steps_to_resample=5, seed=1),
    dict(n_neurons=5, n_dendrites=2, n_dendrite_inputs=20, steps_to_resample=4, lr=3e-3, seed=2),
    dict(n_neurons=3, n_dendrites=4, n_dendrite_inputs=12, soma_enabled=False, seed=3),
]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_epochs_queued_ahead_train_exactly_as_epochs_queued_one_by_one(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch, device: str,
) -> None:
    """Without callbacks every epoch but the first is queued while the one before it is still
    being read back (_launch_ahead: on CUDA; forced in the CPU case, where it only reorders
    the work); with a callback, none is (it may stop a member)."""
    runs = {}
    for ahead in (True, False):
        monkeypatch.setattr(_population, "_AHEAD_ON", (device,) if ahead else ())
        stats: dict[str, Any] = {}
        runs[ahead] = train_population("dendritic_simple", CONFIGS_AHEAD, data, 3, BATCH, device=device,
                                       stats=stats)
        # on CUDA the second epoch captures its evaluation, which waits for the device: not ahead
        assert stats["run_ahead"] == ((2 if device == "cpu" else 1) if ahead else 0)
    for got, want in zip(runs[True], runs[False], strict=True):
        assert got.status == want.status == "completed"
        assert [dict(h, seconds=0) for h in got.history] == [dict(h, seconds=0) for h in want.history]
        assert all(torch.equal(got.state_dict[k], v) for k, v in want.state_dict.items())  # type: ignore[index,union-attr]
    monkeypatch.setattr(_population, "_AHEAD_ON", (device,))
    stats = {}
    train_population("dendritic_simple", CONFIGS_AHEAD, data, 3, BATCH, device=device, stats=stats,
                     on_epoch=lambda i, e, m: False)
    assert stats["run_ahead"] == 0


@pytest.mark.parametrize("where", ["step", "snapshot"])
def test_out_of_memory_in_an_epoch_queued_ahead_is_undone_and_loses_nothing(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch, where: str,
) -> None:
    """The epoch queued ahead fails after some of its steps ran, or in the snapshot before
    them: the members go back to their state after the epoch before, its plans are queued
    again, and it trains once more in turn (not ahead again), the population whole."""
    ahead: list[int] = []
    sizes: list[int] = []
    launch = _Population._launch_ahead
    snapshot = _population._Stack.snapshot

    def launch_ahead(self: _Population, stack: Any) -> Any:
        ahead.append(0)
        try:
            return launch(self, stack)
        finally:
            ahead.pop()

    def fault(k: int) -> None:
        sizes.append(k)
        if where == "step" and ahead and len(sizes) > 14 and not getattr(fault, "done", False):  # mid-epoch
            fault.done = True  # type: ignore[attr-defined]
            raise torch.OutOfMemoryError("injected")

    def snapshot_fault(self: Any) -> Any:
        if where == "snapshot" and ahead and not getattr(fault, "done", False):
            fault.done = True  # type: ignore[attr-defined]
            raise torch.OutOfMemoryError("injected")
        return snapshot(self)

    monkeypatch.setattr(_Population, "_launch_ahead", launch_ahead)
    monkeypatch.setattr(_population._Stack, "snapshot", snapshot_fault)
    monkeypatch.setattr(_population, "_AHEAD_ON", ("cpu",))
    monkeypatch.setattr(_population, "_step_hook", fault)
    stats: dict[str, Any] = {}
    results = train_population("dendritic_simple", CONFIGS_AHEAD, data, 3, BATCH, device="cpu", stats=stats)
    monkeypatch.setattr(_population, "_step_hook", None)
    assert getattr(fault, "done", False)
    assert stats["run_ahead"] == 0 and set(sizes) == {3}  # undone, not halved
    for cfg, r in zip(CONFIGS_AHEAD, results, strict=True):
        _assert_same(r, _solo("dendritic_simple", cfg, data, n_epochs=3), data)


def test_no_epoch_is_queued_ahead_when_another_batch_size_trains_in_the_round(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two members diverge in epoch 1 (their epoch 2, queued ahead, is undone); the refill
    brings a member of another batch size, whose stack trains in the same round after the
    old one: the old stack must not queue an epoch ahead that the new one's turn would undo."""
    monkeypatch.setattr(_population, "_AHEAD_ON", ("cpu",))
    base = dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16)
    configs = [dict(base, seed=1), dict(base, seed=2, lr=1e12), dict(base, seed=3, lr=1e12),
               dict(base, seed=4, batch_size=256)]
    undone: list[bool] = []
    call_back = _Population._call_back

    def spy(self: _Population, stack: Any, snap: Any) -> None:
        undone.append(stack is self.stack)
        call_back(self, stack, snap)

    monkeypatch.setattr(_Population, "_call_back", spy)
    stats: dict[str, Any] = {}
    got = train_population("dendritic_simple", iter(configs), data, 3, BATCH, device="cpu",
                           population_size=3, stats=stats)
    assert undone == [True]  # the divergence's, of the stack that queued it
    monkeypatch.setattr(_population, "_AHEAD_ON", ())
    want = train_population("dendritic_simple", iter(configs), data, 3, BATCH, device="cpu", population_size=3)
    assert [r.status for r in got] == ["completed", "diverged", "diverged", "completed"]
    for a, b in zip(got, want, strict=True):
        assert [dict(h, seconds=0) for h in a.history] == [dict(h, seconds=0) for h in b.history]


def test_states_read_back_through_a_waiting_buffer_equal_those_read_back_directly(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_Stack.states(pinned=...) carves its transfers out of one waiting buffer (on CUDA the
    idle staging buffer, _KEEP_PINNED; here a CPU stand-in) and gives it back; members padded
    and not, with and without moments, equal the direct read-back. A buffer too small is not
    used."""

    class Waiting:  # _PinnedBuffers' try_take / give, one buffer
        def __init__(self, nbytes: int) -> None:
            self.buf = torch.full((nbytes,), 7, dtype=torch.uint8)
            self.given: list[torch.Tensor] = []

        def try_take(self, nbytes: int) -> torch.Tensor | None:
            return self.buf if nbytes <= len(self.buf) else None

        def give(self, t: torch.Tensor) -> None:
            self.given.append(t)

    checked: list[int] = []
    keep = _Population._keep_weights

    def spy(self: _Population, stack: Any, rows: list[int]) -> None:
        every = list(range(stack.K))
        for moments in (False, True):
            direct = stack.states(every, moments=moments)
            for size, used in ((1 << 24, True), (16, False)):
                pool = Waiting(size)
                got = stack.states(every, moments=moments, pinned=pool)  # type: ignore[arg-type]
                assert [t is pool.buf for t in pool.given] == ([True] if used else [])
                for a, b in zip(got, direct, strict=True):
                    for x, y in ((a.params, b.params), (a.exp_avg, b.exp_avg), (a.exp_avg_sq, b.exp_avg_sq)):
                        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                    assert (a.indices is None) == (b.indices is None)
                    assert a.indices is None or torch.equal(a.indices, b.indices)
                    assert all(t.untyped_storage().data_ptr() != pool.buf.data_ptr() for t in a.params.values())
        checked.append(stack.K)
        keep(self, stack, rows)

    monkeypatch.setattr(_Population, "_keep_weights", spy)
    configs = [dict(CONFIGS_AHEAD[0], seed=s) for s in (1, 2)] + CONFIGS_AHEAD[1:]  # two unpadded, two padded
    train_population("dendritic_simple", configs[:2], data, 1, BATCH, device="cpu")
    train_population("dendritic_simple", configs, data, 1, BATCH, device="cpu")
    assert checked == [2, 4]


def test_auto_population_size_on_cpu_runs_a_few_members_at_once(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes: list[int] = []
    monkeypatch.setattr(_population, "_step_hook", sizes.append)
    configs = [dict(hidden_dim=4, n_hidden_layers=1)] * 10
    results = train_population("vanilla_mlp", iter(configs), data, 1, BATCH, device="cpu")
    assert len(results) == 10
    assert max(sizes) == _population._AUTO_CPU
    sizes.clear()
    results = train_population("vanilla_mlp", iter(configs), data, 1, BATCH, device="cpu",
                               max_population=3)
    assert len(results) == 10 and max(sizes) == 3  # "auto" stays under the server's limit
    with pytest.raises(ValueError, match="max_population"):
        train_population("vanilla_mlp", configs, data, 1, device="cpu", population_size=4,
                         max_population=3)


def test_unbatchable_family_is_a_value_error_naming_the_batchable_ones(
    data: core.Dataset,
) -> None:
    others = [name for name in core.list_models() if name not in POPULATION_FAMILIES]
    assert others
    with pytest.raises(ValueError, match="dendritic_simple, dendritic_with_hidden"):
        train_population(others[0], [{}], data, 1)


def test_a_bad_config_fails_alone_and_bad_arguments_are_value_errors(data: core.Dataset) -> None:
    configs = [dict(in_dim=3), dict(hidden_dim=4, lr=-1.0), dict(hidden_dim=4), dict(width=2)]
    reported: list[int] = []
    results = train_population("vanilla_mlp", configs, data, 1, device="cpu",
                               on_result=lambda i, r: reported.append(i))
    assert [r.status for r in results] == ["failed", "failed", "completed", "failed"]
    assert "in_dim" in (results[0].error or "") and "lr" in (results[1].error or "")
    assert "hidden_dim" in (results[3].error or "")  # the family's parameters are listed
    assert sorted(reported) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="population_size"):
        train_population("vanilla_mlp", [{}], data, 1, device="cpu", population_size=0)
    with pytest.raises(ValueError, match="n_epochs"):
        train_population("vanilla_mlp", [{}], data, 0, device="cpu")
    assert train_population("vanilla_mlp", [], data, 1, device="cpu") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("chunk", [1, 3])
def test_members_match_train_model_on_cuda(
    data: core.Dataset, chunk: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_population, "_CHUNK_STEPS", chunk)  # 3: steps replayed three at a time
    configs = [
        dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, steps_to_resample=4, lr=3e-3, seed=1),
        dict(n_neurons=6, n_dendrites=2, n_dendrite_inputs=24, soma_enabled=False,
             steps_to_resample=7, weight_decay=1e-3, seed=2),
        dict(n_neurons=3, n_dendrites=5, n_dendrite_inputs=64, steps_to_resample=3, seed=3),
    ]
    results = train_population("dendritic_simple", configs, data, EPOCHS, BATCH, device="cuda")
    for cfg, got in zip(configs, results, strict=True):
        want = _solo("dendritic_simple", cfg, data, device="cuda")
        got.state_dict = {k: v.cpu() for k, v in got.state_dict.items()}  # type: ignore[attr-defined]
        want.state_dict = {k: v.cpu() for k, v in want.state_dict.items()}  # type: ignore[attr-defined]
        _assert_same(got, want, data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_resamplings_replay_what_eager_ones_do_on_cuda(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # two members resampling together (the whole stack: captured at once) at steps 6, 12, ...
    # and a third alone every 4 steps (captured at its second sighting): replays must swap
    # the same connections and weights as the eager resamplings (steps replayed three at a
    # time between them, one at a time in the eager run)
    configs = [dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, steps_to_resample=6, seed=1),
               dict(n_neurons=5, n_dendrites=2, n_dendrite_inputs=20, steps_to_resample=6, seed=2),
               dict(n_neurons=3, n_dendrites=4, n_dendrite_inputs=40, steps_to_resample=4,
                    resample_reset_adam=False, seed=3)]
    held: list[int] = []

    def run(graphs: bool) -> list[core.TrainResult]:
        monkeypatch.setattr(_population, "_RESAMPLE_GRAPHS", graphs)
        monkeypatch.setattr(_population, "_CHUNK_STEPS", 3 if graphs else 1)
        pop: _Population

        def on_epoch(index: int, epoch: int, metrics: dict[str, Any]) -> None:
            if graphs and pop.stack is not None:
                held.append(len(pop.stack.resample_graphs))

        dev = torch.device("cuda")
        pop = _Population("dendritic_simple", configs, data.to(dev), EPOCHS, BATCH, dev, 0, 3, on_epoch, None)
        return pop.run()

    eager, replayed = run(False), run(True)
    assert max(held) >= 2  # the whole stack's event, and the lone member's
    for a, b in zip(eager, replayed, strict=True):
        for h, g in zip(a.history, b.history, strict=True):
            assert [h[m] for m in METRICS] == pytest.approx([g[m] for m in METRICS], rel=1e-5)
        assert a.state_dict.keys() == b.state_dict.keys()  # type: ignore[attr-defined]
        for name, value in a.state_dict.items():  # type: ignore[attr-defined]
            if value.dtype.is_floating_point:  # the same operations, in one graph or several
                torch.testing.assert_close(value, b.state_dict[name], rtol=1e-5, atol=1e-6)  # type: ignore[attr-defined]
            else:  # the connections resampling chose
                assert torch.equal(value, b.state_dict[name]), name  # type: ignore[attr-defined]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("size", ["auto", 64])
def test_a_population_allocates_one_pinned_staging_buffer_on_cuda(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch, size: int | str,
) -> None:
    # reserved while the stack builds: one buffer, of the whole stack's data orders, serves
    # every epoch's staging (a population size larger than the configs reserves for the stack)
    sizes: list[int] = []
    allocate = _population._PinnedBuffers._allocate

    def counted(nbytes: int) -> torch.UntypedStorage:
        sizes.append(nbytes)
        return allocate(nbytes)

    monkeypatch.setattr(_population._PinnedBuffers, "_allocate", staticmethod(counted))
    configs = [dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, seed=i) for i in range(5)]
    results = train_population("dendritic_simple", configs, data, 3, BATCH, device="cuda", population_size=size)
    assert [r.status for r in results] == ["completed"] * 5
    assert sizes == [5 * len(data.x_train) * 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_staging_buffers_are_written_again_only_after_their_copy_on_cuda() -> None:
    pinned = _population._PinnedBuffers(torch.device("cuda"))
    a = pinned.take((256, 4096), torch.int32)
    assert a.is_pinned() and a.shape == (256, 4096) and a.dtype == torch.int32
    a.copy_(torch.arange(a.numel(), dtype=torch.int32).view_as(a))
    torch.cuda._sleep(50_000_000)  # the copy queued behind ~20 ms of device work
    dev = a.to("cuda", non_blocking=True)
    pinned.give(a)
    b = pinned.take((100, 7), torch.int64)  # smaller: the same buffer, once the copy has run
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    b.fill_(-1)
    assert torch.equal(dev.cpu(), torch.arange(a.numel(), dtype=torch.int32).view_as(a))
    c = pinned.take((256, 4096), torch.int32)  # none waiting: a buffer of its own
    assert c.is_pinned() and c.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    pinned.give(b, None, c)
    small = [pinned.take((3,), torch.uint8) for _ in range(3)]  # the two waiting, then a new one
    assert len({t.untyped_storage().data_ptr() for t in small}) == 3 and not pinned.free
    pinned.give(*small)  # the largest are kept
    assert sorted(st.nbytes() for st, _ in pinned.free) == [a.numel() * 4] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mixed", "same", "plain"])
def test_captured_evaluations_report_what_eager_ones_do_on_cuda(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch, kind: str,
) -> None:
    # members of mixed sizes in bands of their own (a stack this small is one band unless a
    # band costs nothing), of one size (one band of the whole grid), or without somas (the
    # plain step, not the fused one), three epochs: eager at the first, captured at the
    # second (its warm-up reports), replayed at the third
    monkeypatch.setattr(_population, "_BAND_OVERHEAD", 0)
    configs = [dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, seed=1),
               dict(n_neurons=9, n_dendrites=7, n_dendrite_inputs=20, seed=2),
               dict(n_neurons=3, n_dendrites=2, n_dendrite_inputs=40, seed=3)]
    if kind != "mixed":
        configs = [dict(configs[1], seed=i, soma_enabled=kind == "same") for i in range(3)]
    graphs: list[bool] = []

    def run(captured: bool) -> list[core.TrainResult]:
        monkeypatch.setattr(_population, "_EVAL_GRAPHS", captured)
        pop: _Population

        def on_epoch(index: int, epoch: int, metrics: dict[str, Any]) -> None:
            if captured and index == 0 and pop.stack is not None:
                assert pop.stack.whole_grid == (kind != "mixed")
                assert pop.stack.fused == (kind != "plain")
                graphs.append(pop.stack.eval_graph is not None)

        dev = torch.device("cuda")
        pop = _Population("dendritic_simple", configs, data.to(dev), 3, BATCH, dev, 0, 3, on_epoch, None)
        return pop.run()

    eager, replayed = run(False), run(True)
    assert graphs == [False, True, True]
    for a, b in zip(eager, replayed, strict=True):
        assert len(a.history) == len(b.history) == 3
        for h, g in zip(a.history, b.history, strict=True):
            assert [h[m] for m in METRICS] == pytest.approx([g[m] for m in METRICS], rel=1e-6)


@pytest.mark.parametrize("pick_on_device", [False, True])
def test_members_built_without_their_modules_train_and_save_as_module_built_ones(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch, pick_on_device: bool,
) -> None:
    # dendritic_simple members drawn without a module (soma on and off, two sharing an
    # architecture) against the same members built as modules: the same numbers, and the
    # state_dict a module gives (keys, order, metadata, values)
    configs = [dict(n_neurons=3, n_dendrites=4, n_dendrite_inputs=10, steps_to_resample=3, seed=4),
               dict(n_neurons=3, n_dendrites=4, n_dendrite_inputs=10, steps_to_resample=3, seed=5),
               dict(n_neurons=2, n_dendrites=5, n_dendrite_inputs=7, soma_enabled=False, lr=4e-3),
               dict(n_neurons=5, n_dendrites=2, n_dendrite_inputs=12, percentage_resample=0.5),
               dict(n_neurons=2, n_dendrites=3, n_dendrite_inputs=9, connectivity="local")]

    if pick_on_device:  # the connections picked in batches, as on CUDA: three batches here
        monkeypatch.setattr(_population, "_PICK_ON", ("cuda", "cpu"))
        monkeypatch.setattr(_population, "_DRAW_BYTES", 4 * data.in_dim * 20)

    def run(module_free: bool) -> list[core.TrainResult]:
        monkeypatch.setattr(_population, "_MODULE_FREE", module_free)
        pop = _Population("dendritic_simple", configs, data, EPOCHS, BATCH, torch.device("cpu"), 3, 5, None, None)
        out = pop.run()
        # one per architecture; none for the local one (its patches are drawn by its module)
        assert len(pop.templates) == (4 if module_free else 0)
        assert [t is None for t in pop.templates.values()] == ([False] * 3 + [True] if module_free else [])
        return out

    built, drawn = run(False), run(True)
    for cfg, a, b in zip(configs, built, drawn, strict=True):
        assert (a.n_params, a.seed, a.status) == (b.n_params, b.seed, b.status)
        assert [h[m] for h in a.history for m in METRICS] == [h[m] for h in b.history for m in METRICS]
        sa, sb = a.state_dict, b.state_dict
        assert sa is not None and sb is not None
        assert list(sa) == list(sb) and sa._metadata == sb._metadata  # type: ignore[attr-defined]
        for key, value in sa.items():
            assert value.dtype == sb[key].dtype and torch.equal(value, sb[key]), key
            assert sb[key].is_contiguous() and sb[key].untyped_storage().nbytes() == value.numel() * value.element_size()
        net = core.create_model("dendritic_simple", in_dim=data.in_dim, n_classes=data.n_classes,
                                **{k: v for k, v in cfg.items() if k not in ("seed", "lr")})
        net.load_state_dict(sb)  # loads into the family's module as it is


def test_after_resampling_the_dense_matrix_and_gradient_positions_are_those_made_from_scratch(
    data: core.Dataset,
) -> None:
    configs = [dict(n_neurons=2, n_dendrites=3, n_dendrite_inputs=6, steps_to_resample=2,
                    percentage_resample=0.5, seed=5),
               dict(n_neurons=4, n_dendrites=2, n_dendrite_inputs=9, steps_to_resample=3, seed=6)]
    checked = []
    pop: _Population

    def inspect(index: int, epoch: int, metrics: dict[str, Any]) -> None:
        stack = pop.stack
        assert stack is not None and stack.idx is not None and stack.kmask is not None
        K, R, n_in = stack.K, stack.dims.rows, stack.dims.in_dim
        real = stack.kmask > 0
        k = torch.arange(K).view(K, 1, 1).expand_as(stack.idx)
        r = torch.arange(R).view(1, R, 1).expand_as(stack.idx)
        dense = torch.zeros(K, R, n_in, dtype=stack.buf.dtype)  # type: ignore[union-attr]
        dense[k[real], r[real], stack.idx[real]] = stack.plain["dw"][real].to(dense.dtype)
        assert torch.equal(stack._dense(), dense)  # nothing left at a connection's old input
        sink = K * R * n_in
        assert torch.equal(stack.flat_t, torch.where(real, (k * n_in + stack.idx) * R + r, sink))
        checked.append(index)

    pop = _Population("dendritic_simple", configs, data, EPOCHS, BATCH, torch.device("cpu"),
                      0, 2, inspect, None)
    results = pop.run()
    assert len(checked) == 2 * EPOCHS
    assert all(r.status == "completed" for r in results)
    first = core.create_model("dendritic_simple", seed=5, in_dim=data.in_dim, n_classes=data.n_classes,
                              **{k: v for k, v in configs[0].items() if k != "seed"})
    assert not torch.equal(results[0].state_dict["0.indices"], first.state_dict()["0.indices"])  # it resampled


def test_full_collections_are_off_while_a_population_trains_and_come_back_after(data: core.Dataset) -> None:
    """Each full collection went over every member's objects on the main thread (~0.1 s at
    K = 1,024 on the H200 host, bench/results/gc_probe_gpu.txt): a population runs without
    them and restores the collector as it found it, also after an error."""
    import gc

    seen: list[bool] = []

    def on_epoch(i: int, epoch: int, metrics: dict[str, Any]) -> bool:
        seen.append(gc.isenabled())
        return False

    cfg = dict(n_neurons=3, n_dendrites=2, n_dendrite_inputs=8)
    assert gc.isenabled()
    train_population("dendritic_simple", [cfg, cfg], data, 1, BATCH, device="cpu", on_epoch=on_epoch)
    assert seen == [False, False] and gc.isenabled()

    def boom(i: int, epoch: int, metrics: dict[str, Any]) -> bool:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train_population("dendritic_simple", [cfg], data, 1, BATCH, device="cpu", on_epoch=boom)
    assert gc.isenabled()
    gc.disable()  # a caller that runs without the collector keeps it off
    try:
        train_population("dendritic_simple", [cfg], data, 1, BATCH, device="cpu")
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("split", [False, True])
def test_keep_weights_decides_which_members_read_their_weights_back(data: core.Dataset, split: bool) -> None:
    """Asked once per member that ends, under the caller's index (members of two batch sizes
    train in two groups, renumbered inside), before on_result; a falsy answer leaves
    state_dict None, the rest is unchanged."""
    configs = [dict(n_neurons=2 + i % 3, n_dendrites=2, n_dendrite_inputs=8, seed=i,
                    batch_size=64 if split and i % 2 else BATCH) for i in range(8)]
    asked: list[tuple[int, str]] = []
    order: list[str] = []
    seen: dict[int, Any] = {}

    def keep(i: int, result: core.TrainResult) -> bool:
        asked.append((i, result.status))
        order.append(f"keep {i}")
        return i % 3 == 0

    def on_result(i: int, result: core.TrainResult) -> None:
        order.append(f"result {i}")
        seen[i] = result.state_dict

    stats: dict[str, Any] = {}
    got = train_population("dendritic_simple", configs, data, 1, BATCH, device="cpu", keep_weights=keep,
                           on_result=on_result, population_size=4, stats=stats)
    assert stats["buckets"] == (2 if split else 1)
    assert sorted(asked) == [(i, "completed") for i in range(8)]
    assert all(order.index(f"keep {i}") < order.index(f"result {i}") for i in range(8))
    every = train_population("dendritic_simple", configs, data, 1, BATCH, device="cpu", population_size=4)
    for i, (r, full) in enumerate(zip(got, every, strict=True)):
        assert r.history == [dict(h, seconds=r.history[j]["seconds"]) for j, h in enumerate(full.history)]
        if i % 3:
            assert r.state_dict is None and seen[i] is None
        else:
            assert r.state_dict is not None and seen[i] is r.state_dict
            assert full.state_dict is not None
            assert all(torch.equal(r.state_dict[k], full.state_dict[k]) for k in full.state_dict)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_connection_mask_marks_each_members_own_connections_on_the_padded_grid(device: str) -> None:
    # the padded stack's mask of real connections, made at once on the device, against each
    # member's region of the grid filled one by one (a member without a layer: no row of it)
    archs = [_population._Arch(784, 10, n, d, k, soma=True) for n, d, k in ((3, 2, 5), (5, 4, 9), (1, 1, 1), (5, 1, 3))]
    dims = _population._Dims.of(archs)
    sizes = [(a.n, a.d, a.k) for a in archs] + [(0, 0, 0)]
    want = torch.zeros(len(sizes), dims.rows, dims.k)
    for i, a in enumerate(archs):
        reg = _population._region(want[i], "didx", a, dims)
        assert reg is not None
        reg[0].fill_(1.0)
    got = _population._connection_mask(sizes, dims, torch.device(device))
    assert got.device.type == device and got.dtype == torch.float32
    assert torch.equal(got.cpu(), want)
    assert int(got.sum()) == sum(n * d * k for n, d, k in sizes)
