"""DendriticLayer: connectivity, forward, exact counts and synaptic resampling invariants."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from core import DendriticLayer, count_parameters, register_dendritic_hooks


def _layer(**kw: object) -> DendriticLayer:
    args = {"in_dim": 50, "n_neurons": 4, "n_dendrite_inputs": 8, "n_dendrites": 3, "seed": 1}
    args.update(kw)
    return DendriticLayer(**args)  # type: ignore[arg-type]


def test_seed_positional_order_works() -> None:
    layer = DendriticLayer(784, 10, 32, 23, synaptic_resampling=True)
    assert (layer.in_dim, layer.n_neurons, layer.n_dendrite_inputs, layer.n_dendrites) == (784, 10, 32, 23)


def test_each_dendrite_sees_k_distinct_inputs() -> None:
    layer = _layer()
    assert layer.indices.shape == (12, 8)
    for row in layer.indices:
        assert len(set(row.tolist())) == 8
        assert int(row.min()) >= 0 and int(row.max()) < 50


def test_connectivity_is_seeded() -> None:
    assert torch.equal(_layer(seed=3).indices, _layer(seed=3).indices)
    assert not torch.equal(_layer(seed=3).indices, _layer(seed=4).indices)


@pytest.mark.parametrize("soma", [True, False])
def test_count_matches_seed_formula(soma: bool) -> None:
    n, d, k = 4, 3, 8
    layer = _layer(soma_enabled=soma)
    expected = k * d * n + d * n + d * n + n if soma else k * d * n + d * n
    assert count_parameters(layer) == expected == DendriticLayer.count(n, k, d, soma)


def test_forward_matches_the_definition() -> None:
    layer = _layer()
    x = torch.randn(5, 50)
    dense = torch.zeros(12, 50).scatter(1, layer.indices, layer.weight.detach())
    dend = nn.functional.leaky_relu(x @ dense.t() + layer.bias, 0.1).view(5, 4, 3)
    soma = nn.functional.leaky_relu((dend * layer.soma_weight).sum(-1) + layer.soma_bias, 0.1)
    assert torch.allclose(layer(x), soma, atol=1e-6)
    no_soma = _layer(soma_enabled=False)
    assert no_soma(x).shape == (5, 12)


def test_gather_and_scatter_compute_the_same() -> None:
    a, b = _layer(impl="gather"), _layer(impl="scatter")
    x = torch.randn(7, 50)
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-6)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.allclose(a.weight.grad, b.weight.grad, atol=1e-5)


def test_bad_sizes_name_the_argument() -> None:
    with pytest.raises(ValueError, match="n_dendrite_inputs"):
        DendriticLayer(10, 2, 11, 2)
    with pytest.raises(ValueError, match="n_neurons"):
        DendriticLayer(10, 0, 4, 2)
    with pytest.raises(ValueError, match="percentage_resample"):
        DendriticLayer(10, 2, 4, 2, percentage_resample=1.5)


@pytest.mark.parametrize("bad", [2**64, -(2**63) - 1, 1.5, "3", True])
def test_a_bad_seed_names_the_argument_and_what_is_allowed(bad: object) -> None:
    # what torch.Generator takes, for both connectivities (a local layer's patches use one)
    from core import DendriticConv2d

    for build in (lambda: _layer(seed=bad), lambda: _layer(seed=bad, connectivity="local", in_dim=64),
                  lambda: DendriticConv2d(3, 4, 3, 5, 3, seed=bad)):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\) or None"):
            build()


def test_seeds_at_the_ends_of_the_range_and_numpy_integers_build() -> None:
    import numpy as np

    for seed in (2**64 - 1, -(2**63), -1, np.int64(7)):
        assert _layer(seed=seed, connectivity="local", in_dim=64).indices.shape == (12, 8)
    assert torch.equal(_layer(seed=np.int64(7)).indices, _layer(seed=7).indices)


def test_resample_swaps_only_the_weakest_and_keeps_k_distinct() -> None:
    layer = _layer(n_dendrite_inputs=8, percentage_resample=0.25)
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
    before_idx = layer.indices.clone()
    before_w = layer.weight.detach().clone()
    m = math.floor(8 * 0.25)
    weakest = before_w.abs().topk(m, dim=1, largest=False).indices
    swapped = layer.resample()
    assert swapped == 12 * m
    bound = 1 / math.sqrt(8)
    for r in range(12):
        row = layer.indices[r].tolist()
        assert len(set(row)) == 8  # still exactly k distinct inputs
        for slot in range(8):
            if slot in weakest[r].tolist():
                # a new input, never one the dendrite already used, with a fresh weight
                assert row[slot] not in before_idx[r].tolist()
                assert abs(float(layer.weight.detach()[r, slot])) <= bound
            else:
                assert row[slot] == int(before_idx[r, slot])
                assert float(layer.weight.detach()[r, slot]) == float(before_w[r, slot])


def test_resample_resets_adam_state_of_swapped_slots_only() -> None:
    layer = _layer()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(16, 50)).pow(2).sum().backward()
        opt.step()
    weakest = layer.weight.abs().topk(2, dim=1, largest=False).indices
    layer.resample(opt)
    state = opt.state[layer.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        picked = state[key].gather(1, weakest)
        assert torch.all(picked == 0)
        assert state[key].abs().sum() > 0  # the other slots keep their state


def test_nothing_changes_when_resampling_is_off() -> None:
    layer = _layer(synaptic_resampling=False, steps_to_resample=1)
    idx = layer.indices.clone()
    assert layer.resample() == 0
    for _ in range(5):
        layer.step_resampling(None)
    assert torch.equal(layer.indices, idx)


def test_register_dendritic_hooks_resamples_in_a_plain_loop() -> None:
    model = nn.Sequential(_layer(steps_to_resample=4), nn.Linear(4, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    register_dendritic_hooks(model[0], opt)
    idx = model[0].indices.clone()
    x, y = torch.randn(32, 50), torch.randint(0, 3, (32,))
    for step in range(1, 6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step == 3:
            assert torch.equal(model[0].indices, idx)
    # 4 backward passes happened; the swap lands at the next forward (after the step)
    model(x)
    assert model[0].n_swapped == 12 * 2
    assert not torch.equal(model[0].indices, idx)


def test_register_dendritic_hooks_needs_a_dendritic_layer() -> None:
    with pytest.raises(ValueError, match="DendriticLayer"):
        register_dendritic_hooks(nn.Linear(3, 3))


# -- connectivity ------------------------------------------------------------------------------
def test_random_connectivity_draws_from_the_seed_alone() -> None:
    # the layer's connections and weights are draw_connections' and draw_weights' for its seed
    from core._layers import draw_connections, draw_weights

    expected = draw_connections(1, 12, 50, 8)
    assert torch.equal(_layer().indices, expected)
    w, b, sw, sb = torch.empty(12, 8), torch.empty(12), torch.empty(4, 3), torch.empty(4)
    draw_weights(1, w, b, sw, sb)
    got = _layer()
    assert all(torch.equal(getattr(got, n), t) for n, t in (("weight", w), ("bias", b), ("soma_weight", sw),
                                                                ("soma_bias", sb)))
    assert torch.equal(_layer(connectivity="random").indices, expected)
    assert "patch_origin" not in dict(_layer().named_buffers())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_many_layers_drawn_at_once_are_each_layers_own(device: str) -> None:
    # rows of several layers (different seeds and k) scored and picked together on a device,
    # and their weights drawn at the widest k, are what each layer draws from its seed
    from core._layers import (
        INIT_DENDRITES,
        INIT_SOMAS,
        connection_scores,
        draw_connections,
        draw_weights,
        initial_weights,
        seed_int64,
    )

    dev = torch.device(device)
    layers = [(3, 4, 8, 11), (6, 5, 50, 2**63 + 5), (1, 5, 1, 0), (7, 1, 49, 12345)]  # (n, d, k, seed) of 50 inputs
    counts = torch.tensor([n * d for n, d, _, _ in layers])
    seeds = torch.tensor([seed_int64(s) for *_, s in layers]).repeat_interleave(counts).to(dev)
    ids = torch.cat([torch.arange(int(c)) for c in counts]).to(dev)
    ks = torch.tensor([k for _, _, k, _ in layers]).repeat_interleave(counts).to(dev)
    picked = connection_scores(seeds, ids, 50).topk(50, dim=1).indices
    weights = initial_weights(seeds, ids, ks[:, None], INIT_DENDRITES, 51)
    n_seeds = torch.tensor([seed_int64(s) for *_, s in layers]).repeat_interleave(torch.tensor([n for n, *_ in layers]))
    n_ids = torch.cat([torch.arange(n) for n, *_ in layers])
    n_d = torch.tensor([d for _, d, _, _ in layers]).repeat_interleave(torch.tensor([n for n, *_ in layers]))
    somas = initial_weights(n_seeds.to(dev), n_ids.to(dev), n_d.to(dev)[:, None], INIT_SOMAS, 6)
    assert picked.device.type == weights.device.type == device
    at = at_n = 0
    for n, d, k, seed in layers:
        r = n * d
        assert torch.equal(picked[at : at + r, :k].cpu(), draw_connections(seed, r, 50, k)), (n, d, k)
        w, b, sw, sb = torch.empty(r, k), torch.empty(r), torch.empty(n, d), torch.empty(n)
        draw_weights(seed, w, b, sw, sb)
        assert torch.equal(weights[at : at + r, :k].cpu(), w) and torch.equal(weights[at : at + r, k].cpu(), b)
        assert torch.equal(somas[at_n : at_n + n, :d].cpu(), sw) and torch.equal(somas[at_n : at_n + n, d].cpu(), sb)
        at += r
        at_n += n


def test_a_layers_draws_are_uniform_distinct_and_its_seeds_own() -> None:
    # connections: distinct inputs per dendrite, every input about equally often, the same
    # for the same seed and not for another; weights uniform in +-1/sqrt(fan-in)
    from core._layers import draw_connections, draw_weights

    idx = draw_connections(7, 4000, 50, 10)
    assert idx.shape == (4000, 10) and int(idx.min()) >= 0 and int(idx.max()) < 50
    assert all(len(set(row)) == 10 for row in idx.tolist())
    hits = torch.bincount(idx.flatten(), minlength=50).float()  # 800 expected each
    assert float(hits.min()) > 700 and float(hits.max()) < 900
    first = torch.bincount(idx[:, 0], minlength=50).float()  # the best-scored input, uniform too
    assert float(first.min()) > 40 and float(first.max()) < 130
    assert torch.equal(idx, draw_connections(7, 4000, 50, 10))
    assert not torch.equal(idx, draw_connections(8, 4000, 50, 10))
    assert torch.equal(draw_connections(7, 100, 50, 10), idx[:100])  # a row's draw is its own
    w, b, sw, sb = torch.empty(2000, 16), torch.empty(2000), torch.empty(2000, 9), torch.empty(2000)
    draw_weights(3, w, b, sw, sb)
    for t, bound in ((w, 0.25), (b, 0.25), (sw, 1 / 3), (sb, 1 / 3)):
        assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.9 * bound
        assert abs(float(t.mean())) < 0.1 * bound
        assert abs(float(t.pow(2).mean()) - bound**2 / 3) < 0.15 * bound**2 / 3  # a uniform's variance
    assert not torch.equal(b, w[:, 0]) and len(set(w.flatten().tolist())) > 31000


def _local(**kw: object) -> DendriticLayer:
    args = {"in_dim": 784, "n_neurons": 6, "n_dendrite_inputs": 20, "n_dendrites": 5, "seed": 2,
            "connectivity": "local"}
    args.update(kw)
    return DendriticLayer(**args)  # type: ignore[arg-type]


def _in_patch(layer: DendriticLayer) -> bool:
    c, h, w = layer.image_shape  # type: ignore[misc]
    ph, pw = layer.patch_size  # type: ignore[misc]
    pix = layer.indices % (h * w)
    y, x = pix // w, pix % w
    y0, x0 = layer.patch_origin[:, :1], layer.patch_origin[:, 1:]
    return bool(((y >= y0) & (y < y0 + ph) & (x >= x0) & (x < x0 + pw)).all())


def test_local_connectivity_reads_k_distinct_inputs_of_one_patch() -> None:
    layer = _local()
    assert layer.image_shape == (1, 28, 28)  # inferred from in_dim=784
    assert layer.patch_size == (5, 5)  # the smallest square holding 20 pixels
    assert _in_patch(layer)
    assert all(len(set(row)) == 20 for row in layer.indices.tolist())
    assert layer.patch_mask().sum(1).eq(25).all()
    # the patches sit at different places of the image, all inside it
    assert len({tuple(o) for o in layer.patch_origin.tolist()}) > 10
    assert int(layer.patch_origin.min()) >= 0 and int(layer.patch_origin.max()) <= 28 - 5
    assert torch.equal(_local().indices, layer.indices)


def test_local_patches_span_channels_and_are_clipped_to_the_image() -> None:
    layer = _local(in_dim=3 * 5 * 4, input_shape=(3, 5, 4), n_dendrite_inputs=40)
    assert layer.patch_size == (4, 4)  # 3x3x3=27 < 40 <= 4x4x3, within a 5x4 image
    assert _in_patch(layer)
    channels = {int(i) // 20 for i in layer.indices.flatten()}
    assert channels == {0, 1, 2}
    assert _local(in_dim=64, input_shape=(8, 8), n_dendrite_inputs=9).image_shape == (1, 8, 8)


def test_local_resampling_draws_from_the_same_patch() -> None:
    layer = _local(n_dendrite_inputs=16, percentage_resample=0.25)  # 4x4 patch: no spare input
    assert layer.n_to_resample() == 0
    layer = _local(n_dendrite_inputs=14, percentage_resample=0.5)  # 4x4 patch: 2 spare inputs
    assert layer.n_to_resample() == 2
    before = layer.indices.clone()
    for _ in range(5):
        with torch.no_grad():
            layer.weight.normal_()
        assert layer.resample() == 30 * 2
        assert _in_patch(layer)
        assert all(len(set(row)) == 14 for row in layer.indices.tolist())
    assert not torch.equal(layer.indices, before)


def test_local_connectivity_counts_and_computes_like_random() -> None:
    layer = _local()
    assert count_parameters(layer) == DendriticLayer.count(6, 20, 5, True)
    x = torch.randn(3, 784)
    dense = torch.zeros(30, 784).scatter(1, layer.indices, layer.weight.detach())
    dend = nn.functional.leaky_relu(x @ dense.t() + layer.bias, 0.1).view(3, 6, 5)
    soma = nn.functional.leaky_relu((dend * layer.soma_weight).sum(-1) + layer.soma_bias, 0.1)
    assert torch.allclose(layer(x), soma, atol=1e-5)


def test_bad_connectivity_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="connectivity must be one of 'random', 'local'"):
        _layer(connectivity="grid")
    with pytest.raises(ValueError, match="input_shape"):
        _layer(connectivity="local")  # 50 inputs are no square image
    with pytest.raises(ValueError, match="input_shape"):
        _layer(connectivity="local", input_shape=(5, 11))


def test_resampling_keeps_adam_state_when_asked() -> None:
    layer = _layer(resample_reset_adam=False)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(16, 50)).pow(2).sum().backward()
        opt.step()
    state = {k: v.clone() for k, v in opt.state[layer.weight].items()}
    assert layer.resample(opt) > 0
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[layer.weight][key], state[key])


@pytest.mark.parametrize("connectivity", ["random", "local"])
def test_deferred_draws_give_the_layer_it_would_have_had(connectivity: str) -> None:
    """The population builds members with their layers' draws deferred (run on its workers):
    once drawn, connections and weights are those of a layer built in one go, and the draws
    of each layer come from its own seed, whichever thread or order runs them."""
    from core._layers import deferred_connections

    args = dict(in_dim=64, n_neurons=5, n_dendrite_inputs=9, n_dendrites=3, connectivity=connectivity,
                input_shape=(1, 8, 8))
    want = [DendriticLayer(**args, seed=s) for s in (1, 2)]
    with deferred_connections() as draws:
        got = [DendriticLayer(**args, seed=s) for s in (1, 2)]
        with deferred_connections() as inner:  # nested: the inner block's layers are its own
            DendriticLayer(**args, seed=3)
    assert len(draws) == 2 and len(inner) == 1
    threads = [threading.Thread(target=d) for d in reversed(draws)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.indices, w.indices)
        for name, p in w.named_parameters():
            assert torch.equal(getattr(g, name), p), name
    # outside the block a layer draws at once, as before
    assert torch.equal(DendriticLayer(**args, seed=1).indices, want[0].indices)


def test_padded_rows_give_each_member_its_own_weakest_slots_ties_included() -> None:
    """The population resamples members of several (k, m) at once, padding each to the largest:
    slots past a member's k weigh inf. Its first m weakest slots are then those of its own rows
    alone, in the same order, with equal magnitudes everywhere."""
    from core._layers import weakest_slots

    g = torch.Generator().manual_seed(5)
    rows = 6
    members = [(5, 2), (9, 3), (3, 1), (9, 1)]  # (k, m)
    K_, M_ = max(k for k, _ in members), max(m for _, m in members)
    pw = torch.full((len(members), rows, K_), math.inf)
    want = []
    for i, (k, m) in enumerate(members):
        w = torch.randint(0, 3, (rows, k), generator=g).float()  # few magnitudes: ties everywhere
        want.append(weakest_slots(w, m))
        pw[i, :, :k] = w
    got = weakest_slots(pw, M_)
    for i, (_, m) in enumerate(members):
        assert torch.equal(got[i, :, :m], want[i]), i


def test_the_draws_of_nearby_seeds_streams_and_events_are_unrelated() -> None:
    # every (seed, stream, event) of small seeds, the construction's and the resampling's
    # streams: distinct keys (before v25 the stream was XORed into the seed's low bits, so
    # seed 4's dendrite weights were seed 5's soma weights, scaled)
    from core._layers import INIT_DENDRITES, INIT_SOMAS, draw_rows

    keys = [int(draw_rows(torch.tensor(seed), torch.tensor(event), torch.tensor(0), stream))
            for seed in range(64) for stream in range(1, 6) for event in range(4)]
    assert len(set(keys)) == len(keys)
    a, b = _layer(n_neurons=4, n_dendrites=3, seed=4), _layer(n_neurons=4, n_dendrites=3, seed=5)
    scaled = a.weight.detach()[:4, :3] * math.sqrt(8) / math.sqrt(3)
    assert not torch.allclose(scaled, b.soma_weight.detach(), atol=1e-3)
    assert INIT_DENDRITES != INIT_SOMAS


def test_resampling_draws_come_from_the_seed_and_the_resampling_number_alone() -> None:
    """A resampling's draws are a counter of (layer seed, resampling number): a layer whose
    counter is set to n draws what the n-th resampling of an identical layer drew, whatever
    happened before; the next draws differ. Pinned values keep the streams from moving."""
    from core._layers import _FRESH, _SCORES, _draw_key, draw_rows, fresh_weights, input_scores

    seed, event = _draw_key(7, 2, torch.device("cpu"))
    assert draw_rows(seed, event, torch.arange(3), _SCORES).tolist() == [857692435, 1560162373, 1575996738]
    assert input_scores(draw_rows(seed, event, torch.arange(2), _SCORES), 50)[:, :2].tolist() == [
        [2045843456, 1217953025], [1285059840, 1257574273]]
    fresh = fresh_weights(draw_rows(seed, event, torch.arange(2), _FRESH), 3, torch.tensor(0.5))
    assert fresh[0, 0].item() == pytest.approx(0.31317681074142456, abs=0)

    a, b = _layer(seed=5), _layer(seed=5)
    for _ in range(3):
        a.resample()
    b.n_resamples = 2  # b skips two resamplings: its next draws are a's third
    before = b.weight.detach().clone()
    a2 = _layer(seed=5)
    a2.resample()
    a2.resample()
    assert a.n_resamples == 3
    b.weight.data.copy_(a2.weight)  # the same weakest slots and inputs in use as a had then
    b.indices.copy_(a2.indices)
    b.resample()
    assert torch.equal(b.indices, a.indices) and torch.equal(b.weight, a.weight)
    assert not torch.equal(before, b.weight)
    for seed in (2**64 - 1, -3):  # any seed a torch.Generator takes
        assert _layer(seed=seed).resample() == 12 * 2


def test_input_scores_are_distinct_per_row_uniform_and_the_same_in_any_batch() -> None:
    """Scores hold their input in the low bits (no ties: any sort picks the same k), the k
    best of a row are uniform over its inputs, and a row's scores do not depend on the rows
    computed beside it; fresh weights lie in [-bound, bound)."""
    from core._layers import _FRESH, _SCORES, draw_rows, fresh_weights, input_scores, key_bits

    seed, event = torch.tensor([3, 3, 9]).view(3, 1), torch.tensor([0, 1, 0]).view(3, 1)
    rows = torch.arange(400).expand(3, -1)
    scores = input_scores(draw_rows(seed, event, rows, _SCORES), 100)
    assert scores.shape == (3, 400, 100) and scores.dtype == torch.int32 and (scores >= 0).all()
    assert torch.equal(scores & ((1 << key_bits(100)) - 1), torch.arange(100).expand_as(scores))
    lone = input_scores(draw_rows(torch.tensor(3), torch.tensor(1), torch.arange(400), _SCORES), 100)
    assert torch.equal(scores[1], lone)
    assert not torch.equal(scores[0], scores[1]) and not torch.equal(scores[0], scores[2])
    counts = torch.bincount(scores.topk(10, dim=2).indices.flatten(), minlength=100).float()
    assert counts.std() / counts.mean() < 0.1  # binomial: ~0.05
    # past 2,048 inputs an int32 score would keep too few hash bits: int64, the whole hash
    wide = input_scores(draw_rows(torch.tensor(3), torch.tensor(0), torch.arange(400), _SCORES), 5000)
    assert wide.dtype == torch.int64 and (wide >= 0).all()
    assert torch.equal(wide & ((1 << key_bits(5000)) - 1), torch.arange(5000).expand_as(wide))
    chosen = wide.topk(10, dim=1).indices.float()
    assert abs(chosen.mean().item() / 5000 - 0.5) < 0.02  # no lean towards the higher inputs
    bound = torch.tensor([0.5, 0.25, 0.125]).view(3, 1, 1)
    fresh = fresh_weights(draw_rows(seed, event, rows, _FRESH), 7, bound)
    assert fresh.shape == (3, 400, 7)
    assert (fresh.abs() <= bound).all() and (fresh.amax((1, 2)) > 0.9 * bound.view(3)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resampling_on_cuda_draws_what_it_draws_on_the_cpu() -> None:
    """The scores (Triton's kernel or PyTorch's ops) and the fresh weights are the same numbers on
    the GPU as on the CPU, so a layer resamples alike on both."""
    from core import _kernels
    from core._layers import _SCORES, draw_rows, input_scores

    keys = draw_rows(torch.tensor(11), torch.tensor(4), torch.arange(5000), _SCORES)
    for n in (5, 64, 784, 2048, 3072):  # 3072: int64 scores, PyTorch's ops on both
        want = input_scores(keys, n)
        assert torch.equal(input_scores(keys.cuda(), n).cpu(), want), n
        if _kernels.available(torch.device("cuda")) and n <= 2048:
            assert torch.equal(_kernels.input_scores(keys.cuda(), n).cpu(), want), n
    cpu, gpu = _layer(seed=3, in_dim=784), _layer(seed=3, in_dim=784).cuda()
    for _ in range(3):
        cpu.resample()
        gpu.resample()
    assert torch.equal(gpu.indices.cpu(), cpu.indices) and torch.equal(gpu.weight.detach().cpu(), cpu.weight)
