"""train_population's speed paths: precisions, size buckets, the torch.func peer of the bench."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import core
from core import _kernels, _population
from core._population import PRECISIONS, size_buckets, train_population

BATCH = 128


@pytest.fixture(scope="module")
def data() -> core.Dataset:
    return core.load_dataset("digits")


def _solo(config: dict[str, Any], data: core.Dataset, n_epochs: int) -> core.TrainResult:
    cfg = dict(config)
    lr, seed = cfg.pop("lr", 1e-3), cfg.pop("seed")
    model = core.create_model("dendritic_simple", seed=seed, in_dim=data.in_dim,
                              n_classes=data.n_classes, **cfg)
    return core.train_model(model, data, n_epochs, lr, 0.0, BATCH, device="cpu", seed=seed)


def test_unknown_precision_is_a_value_error_naming_the_allowed_ones(data: core.Dataset) -> None:
    for bad in ("fp16", "FP32", 32, None):
        with pytest.raises(ValueError, match="'fp32', 'tf32', 'bf16'"):
            train_population("dendritic_simple", [{}], data, 1, device="cpu", precision=bad)  # type: ignore[arg-type]
    assert PRECISIONS == ("fp32", "tf32", "bf16")


def test_bf16_members_stay_close_to_fp32_and_tf32_is_fp32_on_the_cpu(data: core.Dataset) -> None:
    configs = [dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, steps_to_resample=5,
                    lr=5e-3, seed=s) for s in (1, 2)]
    got = {p: train_population("dendritic_simple", configs, data, 2, BATCH, device="cpu", precision=p)
           for p in PRECISIONS}
    for f, t, b in zip(got["fp32"], got["tf32"], got["bf16"], strict=True):
        assert t.history == [dict(h, seconds=t.history[i]["seconds"]) for i, h in enumerate(f.history)]
        assert b.status == "completed"
        assert b.train_loss == pytest.approx(f.train_loss, rel=0.05)
        assert abs((b.test_accuracy or 0) - (f.test_accuracy or 0)) < 0.05


def test_size_buckets_cover_every_config_once_and_fill_their_grids() -> None:
    configs: list[dict[str, Any]] = [
        dict(n_neurons=n, n_dendrites=d, n_dendrite_inputs=8)
        for n in (2, 3, 12, 16) for d in (2, 3, 10, 12) for _ in range(4)
    ]
    configs.append(dict(n_neurons=-1))  # unreadable: fails when built, rides in the first bucket
    groups = size_buckets("dendritic_simple", configs, 64, 10, min_size=4)
    assert sorted(i for g in groups for i in g) == list(range(len(configs)))
    assert 1 < len(groups) and all(len(g) >= 4 for g in groups)
    fills = []
    for g in groups:
        sizes = [(configs[i]["n_neurons"], configs[i]["n_dendrites"]) for i in g if i < 64]
        big_n, big_d = max(n for n, _ in sizes), max(d for _, d in sizes)
        fills.append(sum(n * d for n, d in sizes) / (len(sizes) * big_n * big_d))
    assert min(fills) >= 0.7
    # uniform or small populations stay whole
    assert size_buckets("dendritic_simple", configs[:4], 64, 10, min_size=4) == [[0, 1, 2, 3]]
    assert size_buckets("vanilla_mlp", [{}] * 300, 64, 10) == [list(range(300))]


def test_bucketed_members_train_exactly_and_report_under_their_own_index(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_population, "_MIN_BUCKET", 2)
    configs = [
        dict(n_neurons=2, n_dendrites=2, n_dendrite_inputs=8, steps_to_resample=3, lr=3e-3),
        dict(n_neurons=8, n_dendrites=6, n_dendrite_inputs=12, steps_to_resample=4),
        dict(n_neurons=2, n_dendrites=3, n_dendrite_inputs=8, steps_to_resample=5),
        dict(n_neurons=9, n_dendrites=6, n_dendrite_inputs=10, steps_to_resample=2),
    ]
    seen: list[tuple[int, int]] = []
    stats: dict[str, Any] = {}
    results = train_population("dendritic_simple", configs, data, 1, BATCH, device="cpu", seed=7,
                               on_epoch=lambda i, e, m: seen.append((i, e)), stats=stats)
    assert stats["buckets"] == 2 and sorted(seen) == [(i, 1) for i in range(4)]
    assert 0 < stats["useful_flops"] <= stats["executed_flops"]
    # each bucket's epoch staged on the main thread (the CPU stages nothing ahead), joined
    assert stats["staged_here"] == len(stats["staging_seconds"]) == 2
    assert all(s >= 0 for s in stats["staging_seconds"])
    whole: dict[str, Any] = {}
    train_population("dendritic_simple", configs, data, 1, BATCH, device="cpu", seed=7,
                     buckets=False, stats=whole)
    assert whole["buckets"] == 1 and whole["useful_flops"] == stats["useful_flops"]
    assert stats["executed_flops"] < whole["executed_flops"]  # less padding
    # 4 FLOPs per multiply-add of an example's forward pass: dense dendrite matrix, somas, readout
    n_in, per = data.in_dim, 4.0 * len(data.x_train)

    def macs(n: int, d: int) -> int:
        return n * d * n_in + n * d + n * data.n_classes
    own = sum(macs(c["n_neurons"], c["n_dendrites"]) for c in configs)
    assert stats["useful_flops"] == pytest.approx(per * own)
    assert whole["executed_flops"] == pytest.approx(per * 4 * macs(9, 6))  # one stack, 9 x 6 grid
    for i, (cfg, got) in enumerate(zip(configs, results, strict=True)):
        want = _solo(dict(cfg, seed=7 + i), data, 1)
        assert got.seed == 7 + i
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-4)
        assert got.test_loss == pytest.approx(want.test_loss, rel=1e-4)


def test_cuda_graphs_and_the_triton_head_are_not_used_on_the_cpu(data: core.Dataset) -> None:
    pop = _population._Population("dendritic_simple", [{}], data, 1, BATCH, torch.device("cpu"),
                                  0, 1, None, None)
    assert not pop.graphs
    assert not _kernels.available(torch.device("cpu"))


_INTERPRETED = """
import torch
from torch.nn import functional as F
from core import _kernels
torch.manual_seed(0)
K, B, n, d, C = 2, 37, N_NEURONS, N_DENDRITES, 10  # B not a multiple of the batch block: masked rows
assert _kernels.head_config(n, d, C)[4] == DOT, "the test covers the other path"
offs = {"sw": 5, "sb": 5 + n * d, "wo": 5 + n * d + n, "bo": 5 + n * d + n + C * n, "C": C}
p = torch.randn(K, offs["bo"] + C + 3)
z, y = torch.randn(K, B, n * d), torch.randint(0, C, (K, B))
got = _kernels.soma_head(z, p, offs, n, d, y)
leaves = [z.clone(), p[:, offs["sw"] : offs["sb"]].reshape(K, n, d), p[:, offs["sb"] : offs["wo"]],
          p[:, offs["wo"] : offs["bo"]].reshape(K, C, n), p[:, offs["bo"] : offs["bo"] + C]]
zz, sw, sb, wo, bo = (t.clone().requires_grad_(True) for t in leaves)
h = F.leaky_relu(zz, 0.1).view(K, B, n, d)
s = F.leaky_relu((h * sw.unsqueeze(1)).sum(-1) + sb.unsqueeze(1), 0.1)
out = torch.baddbmm(bo.unsqueeze(1), s, wo.transpose(1, 2))
ce = F.cross_entropy(out.reshape(-1, C), y.reshape(-1), reduction="none").view(K, B).mean(1)
grads = torch.autograd.grad(ce.sum(), [zz, sw, sb, wo, bo], retain_graph=True)
want = [ce, (out.argmax(2) == y).sum(1).float(), *grads, grads[0].sum(1)]  # db: dL/dz summed over the batch
for g, w in zip(got, want, strict=True):
    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
# per-member label smoothing: each member's loss is cross_entropy(label_smoothing=its own)
eps = torch.tensor([0.0, 0.25])
got = _kernels.soma_head(z, p, offs, n, d, y, eps)
ce = torch.stack([F.cross_entropy(out[k], y[k], label_smoothing=float(eps[k])) for k in range(K)])
grads = torch.autograd.grad(ce.sum(), [zz, sw, sb, wo, bo], retain_graph=True)
want = [ce, (out.argmax(2) == y).sum(1).float(), *grads, grads[0].sum(1)]
for g, w in zip(got, want, strict=True):
    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
# bfloat16: the product without its bias, which the head adds in float32 (as z.float() + db);
# dL/dz written in bfloat16, rounded as Tensor.to rounds
offs["db"] = 0
zb = (z - p[:, :n * d].unsqueeze(1)).to(torch.bfloat16)
got = _kernels.soma_head(zb, p, offs, n, d, y, add_bias=True, grad_dtype=torch.bfloat16)
zz = (zb.float() + p[:, :n * d].unsqueeze(1)).requires_grad_(True)
h = F.leaky_relu(zz, 0.1).view(K, B, n, d)
s = F.leaky_relu((h * sw.unsqueeze(1)).sum(-1) + sb.unsqueeze(1), 0.1)
out = torch.baddbmm(bo.unsqueeze(1), s, wo.transpose(1, 2))
ce = F.cross_entropy(out.reshape(-1, C), y.reshape(-1), reduction="none").view(K, B).mean(1)
grads = torch.autograd.grad(ce.sum(), [zz, sw, sb, wo, bo])
want = [ce, (out.argmax(2) == y).sum(1).float(), grads[0], *grads[1:], grads[0].sum(1)]
assert got[2].dtype == torch.bfloat16
for i, (g, w) in enumerate(zip(got, want, strict=True)):
    # the interpreter rounds float32 to bfloat16 toward zero (the GPU to nearest even, which
    # test_the_bf16_head_adds_the_bias_and_rounds_its_gradient_as_the_float32_head_on_cuda checks)
    torch.testing.assert_close(g.float(), w, rtol=1 / 128 if i == 2 else 1e-5, atol=1e-6)
# a band: the first n2 neurons of rows laid out for n (n_stored) are the head of those alone
n2 = 2
o2 = {"db": 0, "sw": n2 * d, "sb": 2 * n2 * d, "wo": 2 * n2 * d + n2, "bo": 2 * n2 * d + n2 + C * n2, "C": C}
p2 = torch.cat([p[:, : n2 * d], p[:, offs["sw"] : offs["sw"] + n2 * d], p[:, offs["sb"] : offs["sb"] + n2],
                p[:, offs["wo"] : offs["bo"]].reshape(K, C, n)[:, :, :n2].reshape(K, -1),
                p[:, offs["bo"] : offs["bo"] + C]], 1)
offs["db"] = 0
z2 = z[:, :, : n2 * d].contiguous()
for a, b in zip(_kernels.soma_head(z2, p, offs, n2, d, y, eps, n_stored=n),
                _kernels.soma_head(z2, p2, o2, n2, d, y, eps), strict=True):
    assert torch.equal(a, b)
# a band that starts at member 1: p, y and eps are the population's, z the band's own
for a, b in zip(_kernels.soma_head(z[1:], p, offs, n, d, y, eps, first=1),
                _kernels.soma_head(z[1:], p[1:], offs, n, d, y[1:], eps[1:]), strict=True):
    assert torch.equal(a, b)
# rows aligned past the grid (a fused band's, _population._ROW_ALIGN): z's extra columns are
# not read (NaN there changes nothing), dL/dz is zero there and the same elsewhere
R = -(-(n * d) // 8) * 8 + 8
za = torch.full((K, B, R), float("nan"))
za[:, :, : n * d] = z
aligned = _kernels.soma_head(za, p, offs, n, d, y, eps)
for i, (a, b) in enumerate(zip(aligned, _kernels.soma_head(z, p, offs, n, d, y, eps), strict=True)):
    if i == 2:
        assert a.shape == (K, B, R) and torch.equal(a[:, :, n * d :], torch.zeros(K, B, R - n * d))
        a = a[:, :, : n * d]
    assert torch.equal(a, b), i
# the evaluation: one shared batch, z laid out (examples, members x aligned rows), no gradients;
# the sums of the step's loss and counts with every member given the same labels
ze = za.transpose(0, 1).reshape(B, K * R).contiguous()
loss_e, right_e = _kernels.soma_eval(ze, p, offs, n, d, y[0], R)
ref = _kernels.soma_head(z, p, offs, n, d, y[0].expand(K, B).contiguous())
torch.testing.assert_close(loss_e, ref[0] * B, rtol=1e-5, atol=1e-5)
assert torch.equal(right_e, ref[1])
print("same")
"""


def _interpret(code: str) -> None:
    """Run ``code`` with Triton's interpreter (CPU tensors); it must print "same"."""
    pytest.importorskip("triton", reason="Triton is not installed here")
    # TRITON_INTERPRET must be set before Triton is first imported: a process of its own
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("n_neurons, n_dendrites, dot", [(3, 5, False), (17, 5, True), (20, 20, False)])
def test_fused_head_kernel_matches_autograd_in_the_triton_interpreter(
    n_neurons: int, n_dendrites: int, dot: bool,
) -> None:
    """Plain and per-member label-smoothed cross-entropy, against autograd; the readout's
    products as tl.dot (blocks of 16 examples and more, 32 padded neurons) and as broadcast
    sums (4 padded neurons; a 32 x 32 grid, in blocks of 8)."""
    _interpret(_INTERPRETED.replace("N_NEURONS", str(n_neurons)).replace("N_DENDRITES", str(n_dendrites))
               .replace("== DOT", f"== {dot}"))


_SCORES_INTERPRETED = """
import torch
from core import _kernels
from core._layers import _SCORES, draw_rows, input_scores
keys = draw_rows(torch.tensor([5, 2**40 + 3]).view(2, 1), torch.tensor([0, 7]).view(2, 1),
                 torch.arange(30).expand(2, -1), _SCORES)
for n in (1, 5, 64, 784, 1500):  # 1500: two blocks, the second masked
    got = _kernels.input_scores(keys, n)
    assert got.shape == (2, 30, n) and got.dtype == torch.int32
    assert torch.equal(got, input_scores(keys, n)), n  # the CPU: PyTorch's ops
print("same")
"""


def test_the_scores_kernel_gives_the_pytorch_scores_in_the_triton_interpreter() -> None:
    """Resampling scores from Triton's kernel are the integers the PyTorch ops compute."""
    _interpret(_SCORES_INTERPRETED)


_ADAM_INTERPRETED = """
import torch
from core import _kernels
from core._population import _BETA1, _BETA2, _EPS
torch.manual_seed(0)
K, P = 3, 2500  # P not a multiple of the block: masked tail
for wd in (None, torch.tensor([0.0, 1e-2, 0.5])):
    p, m, g = torch.randn(K, P), torch.randn(K, P) * 0.1, torch.randn(K, P)
    v = torch.rand(K, P) * 0.01
    steps = torch.tensor([1.0, 7.0, 300.0], dtype=torch.float64)
    lr = torch.tensor([1e-3, 5e-3, 2e-2], dtype=torch.float64)
    step_size = (lr / (1 - torch.pow(_BETA1, steps))).float()
    bc2 = torch.sqrt(1 - torch.pow(_BETA2, steps)).float()
    want = [t.clone() for t in (p, m, v)]
    gg = g if wd is None else torch.addcmul(g, wd.unsqueeze(1), want[0])
    want[1].lerp_(gg, 1 - _BETA1)
    want[2].mul_(_BETA2).addcmul_(gg, gg, value=1 - _BETA2)
    want[0].sub_((want[1] / (want[2].sqrt() / bc2.unsqueeze(1)).add_(_EPS)).mul_(step_size.unsqueeze(1)))
    _kernels.adam_rows(p, m, v, g, step_size, bc2, wd, _BETA1, _BETA2, _EPS)
    for got, w in zip((p, m, v), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
print("same")
"""


def test_fused_adam_kernel_matches_the_pytorch_update_in_the_triton_interpreter() -> None:
    """Per-row learning rates, step counts and weight decay, against the element-wise ops."""
    _interpret(_ADAM_INTERPRETED)


_ADAM_CONNECTIONS = """
import torch
from core import _kernels
from core._population import _BETA1, _BETA2, _EPS
torch.manual_seed(0)
K, n, d, kpad, tail = 3, 3, 2, 5, 7
R = n * d
sizes = torch.tensor([[3, 1, 2], [2, 2, 1], [5, 3, 2]], dtype=torch.int32)  # neurons, dendrites, inputs
real = torch.zeros(K, n, d, kpad, dtype=torch.bool)
for i in range(K):
    real[i, : sizes[0, i], : sizes[1, i], : sizes[2, i]] = True
real = real.view(K, R, kpad)
G = 200
gd = torch.randn(G + 1).to(torch.bfloat16)
gd[-1] = 0  # the sink
at = torch.full((K, R, kpad), G)
at[real] = torch.randperm(G)[: int(real.sum())]
P = R * kpad + tail
# one program for a member's slots, or several (blocks of 4), the grid sized by every slot or
# by a member's most (3 x 2 x 5)
for wd, block, slots in ((None, 1024, None), (torch.tensor([0.0, 1e-2, 0.5]), 1024, None),
                         (None, 4, None), (torch.tensor([0.0, 1e-2, 0.5]), 4, 30)):
    _kernels._ADAM_BLOCK = block
    p, m, v = torch.zeros(K, P), torch.zeros(K, P), torch.zeros(K, P)
    for t, scale in ((p, 1.0), (m, 0.1), (v, 0.01)):
        t[:, : R * kpad].view(K, R, kpad)[real] = torch.rand(int(real.sum())) * scale
        t[:, R * kpad :] = torch.rand(K, tail) * scale
    steps = torch.tensor([1.0, 7.0, 300.0], dtype=torch.float64)
    lr = torch.tensor([1e-3, 5e-3, 2e-2], dtype=torch.float64)
    step_size = (lr / (1 - torch.pow(_BETA1, steps))).float()
    bc2 = torch.sqrt(1 - torch.pow(_BETA2, steps)).float()
    want = [t.clone() for t in (p, m, v)]
    before = [t.clone() for t in (p, m, v)]
    g = torch.cat([gd.take(at).view(K, -1).float(), torch.zeros(K, tail)], 1)
    _kernels.adam_rows(*want, g, step_size, bc2, wd, _BETA1, _BETA2, _EPS)  # every slot
    _kernels.adam_connections(p, m, v, gd, at, sizes, d, step_size, bc2, wd, _BETA1, _BETA2, _EPS,
                              slots=slots)
    for got, w, b in zip((p, m, v), want, before, strict=True):
        assert torch.equal(got[:, : R * kpad], w[:, : R * kpad])  # the same operations
        assert torch.equal(got[:, R * kpad :], b[:, R * kpad :])  # the columns after: not its job
    assert int(torch.count_nonzero(p[:, : R * kpad].view(K, R, kpad)[~real])) == 0  # padding untouched
print("same")
"""


def test_the_fused_adam_of_the_connections_reads_their_gradient_and_skips_the_padding_in_the_interpreter(
) -> None:
    """Against a take of every slot and the whole-row Adam: its own slots equal, padding left zero."""
    _interpret(_ADAM_CONNECTIONS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton head runs on CUDA only")
def test_fused_head_members_match_train_model_on_cuda(data: core.Dataset) -> None:
    configs = [
        dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, steps_to_resample=4, lr=3e-3, seed=1),
        dict(n_neurons=6, n_dendrites=2, n_dendrite_inputs=24, steps_to_resample=7, seed=2),
    ]
    results = train_population("dendritic_simple", configs, data, 2, BATCH, device="cuda")
    _assert_like_train_model_on_cuda(configs, results, data, rtol=1e-4, atol=1e-5)


def _assert_like_train_model_on_cuda(configs: list[dict[str, Any]], results: list[core.TrainResult],
                                     data: core.Dataset, rtol: float, atol: float) -> None:
    """Each member's 2-epoch history (losses to 1e-4) and weights (to ``rtol``/``atol``;
    connections exactly) against ``train_model`` on CUDA with the same config."""
    for cfg, got in zip(configs, results, strict=True):
        c = dict(cfg)
        lr, seed = c.pop("lr", 1e-3), c.pop("seed")
        recipe = {k: c.pop(k) for k in ("weight_decay", "label_smoothing") if k in c}
        model = core.create_model("dendritic_simple", seed=seed, in_dim=data.in_dim,
                                  n_classes=data.n_classes, **c)
        want = core.train_model(model, data, 2, lr, recipe.get("weight_decay", 0.0), BATCH, device="cuda",
                                seed=seed, label_smoothing=recipe.get("label_smoothing", 0.0))
        for g, w in zip(got.history, want.history, strict=True):
            for key in ("train_loss", "val_loss", "test_loss"):
                assert g[key] == pytest.approx(w[key], rel=1e-4), key
        assert got.state_dict is not None
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                torch.testing.assert_close(got.state_dict[name], value.cpu(), rtol=rtol, atol=atol)
            else:
                assert torch.equal(got.state_dict[name], value.cpu()), name


def test_the_benchs_torch_func_ensemble_trains_two_members_on_the_cpu(data: core.Dataset) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    try:
        from _baseline import func_ensemble_train
    finally:
        sys.path.pop(0)
    out = func_ensemble_train(data, 2, dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16),
                              2, BATCH, 1e-2, torch.device("cpu"))
    assert len(out["test_accuracy"]) == 2 and out["seconds"] >= out["last_epoch_seconds"] > 0
    assert all(a > 0.2 for a in out["test_accuracy"])  # better than chance (0.1) after 2 epochs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_cuda_stays_within_a_few_points_of_fp32(data: core.Dataset) -> None:
    configs = [dict(n_neurons=6, n_dendrites=4, n_dendrite_inputs=24, lr=5e-3, seed=s) for s in range(3)]
    f = train_population("dendritic_simple", configs, data, 3, BATCH, device="cuda")
    b = train_population("dendritic_simple", configs, data, 3, BATCH, device="cuda", precision="bf16")
    for x, y in zip(f, b, strict=True):
        assert abs((x.test_accuracy or 0) - (y.test_accuracy or 0)) < 0.05


def test_the_fused_heads_block_doubles_only_where_its_class_products_stay_small() -> None:
    assert _kernels._block(32, 16, 16) == 16  # the seed space's 20 x 15 grid, 10 classes: 8,192
    assert _kernels._block(16, 8, 16) == 64  # 12 x 6: capped at 64 examples
    assert _kernels._block(32, 16, 128) == 8  # 100 classes: the 4,096 rule's block, as before
    assert _kernels._block(64, 64, 16) == 2


def test_a_members_flat_row_is_a_multiple_of_16_long_and_its_tail_stays_zero(data: core.Dataset) -> None:
    seen = []
    for k in (8, 9, 13, 31):  # rows of any length
        dims = _population._Dims.of([_population._parse(core.create_model(
            "dendritic_simple", seed=0, in_dim=data.in_dim, n_classes=data.n_classes, n_neurons=3,
            n_dendrites=2, n_dendrite_inputs=k), "dendritic_simple")[0]])
        assert dims.stride % 16 == 0 and 0 <= dims.stride - dims.numel < 16
        seen.append(dims.numel % 16)
    assert len(set(seen)) > 1  # the lengths themselves differ in their divisibility
    pop = _population._Population("dendritic_simple", [dict(n_neurons=3, n_dendrites=2, n_dendrite_inputs=9,
                                                            lr=1e-2, weight_decay=1e-2, seed=3)],
                                  data, 2, BATCH, torch.device("cpu"), 0, 1, None, None)
    tails = []
    pop._epoch = _keep_tail(pop, tails)  # type: ignore[method-assign]
    pop.run()
    assert tails and all(t == 0 for t in tails)


def _keep_tail(pop: Any, tails: list[int]) -> Any:
    epoch = pop._epoch

    def wrapped(stack: Any) -> Any:
        out = epoch(stack)
        for buf in (stack.p, stack.m, stack.v):
            assert buf.shape[1] == stack.dims.stride
            tails.append(int(torch.count_nonzero(buf[:, stack.dims.numel :])))
        return out

    return wrapped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stacks_of_other_sizes_reuse_the_fused_kernels_compiled_for_the_first(data: core.Dataset) -> None:
    tri = _kernels._triton()
    assert tri is not None

    def compiled() -> int:  # the specializations in Triton's in-memory cache of both kernels
        return sum(len(c[0]) for kernel in tri[1:] for c in kernel.device_caches.values())

    train_population("dendritic_simple", [dict(n_neurons=5, n_dendrites=3, n_dendrite_inputs=16, seed=0)],
                     data, 1, BATCH, device="cuda")
    first = compiled()
    assert first >= 2  # the head and Adam, built for the first stack
    for k in (17, 23, 40):  # other row lengths on the same (neurons, dendrites) grid
        train_population("dendritic_simple", [dict(n_neurons=5, n_dendrites=3, n_dendrite_inputs=k, seed=0)],
                         data, 1, BATCH, device="cuda")
    assert compiled() == first

@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton head runs on CUDA only")
def test_the_bf16_head_adds_the_bias_and_rounds_its_gradient_as_the_float32_head_on_cuda() -> None:
    torch.manual_seed(0)
    K, B, n, d, C = 3, 200, 7, 5, 10
    offs = {"db": 0, "sw": n * d, "sb": 2 * n * d, "wo": 2 * n * d + n, "bo": 2 * n * d + n + C * n, "C": C}
    p = torch.randn(K, offs["bo"] + C, device="cuda")
    zb = torch.randn(K, B, n * d, device="cuda").to(torch.bfloat16)
    y = torch.randint(0, C, (K, B), device="cuda")
    plain = _kernels.soma_head(zb.float() + p[:, : n * d].unsqueeze(1), p, offs, n, d, y)
    fused = _kernels.soma_head(zb, p, offs, n, d, y, add_bias=True, grad_dtype=torch.bfloat16)
    assert fused[2].dtype == torch.bfloat16
    assert torch.equal(fused[2], plain[2].to(torch.bfloat16))  # rounded to nearest even
    for a, b in zip(fused[:2] + fused[3:], plain[:2] + plain[3:], strict=True):
        assert torch.equal(a, b)


def test_a_fused_kernel_that_fails_switches_triton_off_but_out_of_memory_reaches_the_halving(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_kernels, "_DISABLED", [])
    oom = torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.OutOfMemoryError):
        _population._without_triton(oom, "Adam")
    assert not _kernels._DISABLED  # Triton stays on: the population halves
    with caplog.at_level("WARNING", logger=_population.logger.name):
        _population._without_triton(RuntimeError("no ptxas"), "head")
    assert _kernels._DISABLED
    assert "fused Triton head unavailable (no ptxas); using PyTorch" in caplog.text


@pytest.mark.parametrize("exc", [TypeError("head_kernel() takes 30 positional arguments"), AssertionError(),
                                 KeyError("sw"), IndexError("tuple index out of range")])
def test_a_python_error_in_a_fused_kernel_is_raised_and_leaves_triton_on(
    monkeypatch: pytest.MonkeyPatch, exc: Exception,
) -> None:
    monkeypatch.setattr(_kernels, "_DISABLED", [])
    with pytest.raises(type(exc)):
        _population._without_triton(exc, "head")
    assert not _kernels._DISABLED


def test_the_machines_own_failures_switch_triton_off(monkeypatch: pytest.MonkeyPatch) -> None:
    class CompilationError(Exception):  # as triton.compiler.errors names its own
        pass

    CompilationError.__module__ = "triton.compiler.errors"
    scope: dict[str, Any] = {"__name__": "triton.backends.nvidia.driver"}
    exec("def library_dirs():\n    assert False, 'libcuda.so cannot found!'", scope)  # as Triton 3.8's driver
    try:
        scope["library_dirs"]()
    except AssertionError as exc:
        in_triton = exc
    for exc in (CompilationError("ptxas fatal"), OSError("libcuda.so not found"), ImportError("triton"),
                subprocess.CalledProcessError(1, ["gcc"]), RuntimeError("Triton Error [CUDA]: no kernel image"),
                in_triton):
        monkeypatch.setattr(_kernels, "_DISABLED", [])
        _population._without_triton(exc, "Adam")
        assert _kernels._DISABLED, exc


def test_bands_follow_the_sorted_neurons_and_cut_the_padded_rows() -> None:
    shapes = [(n, 15) for n in sorted([5] * 40 + [8] * 30 + [12] * 30 + [20] * 20)]
    bands = _population._bands(shapes, 15)
    assert bands[0][0] == 0 and bands[-1][1] == len(shapes) and 1 < len(bands) <= _population._MAX_BANDS
    assert all(a < b == c for (a, b, _, _), (c, _, _, _) in zip(bands, bands[1:], strict=False))
    # a band covers its members' neurons and dendrites
    assert all((n, d) == tuple(map(max, zip(*shapes[a:b], strict=True))) for a, b, n, d in bands)
    assert sum((b - a) * n for a, b, n, _ in bands) < 0.7 * len(shapes) * 20
    assert _population._bands([(20, 15)] * 10, 15) == [(0, 10, 20, 15)]
    assert _population._bands([], 15) == []
    unsorted = [(5, 15), (20, 15)] * 60  # no long runs to cut: one band
    assert _population._bands(unsorted, 15) == [(0, 120, 20, 15)]
    # one band runs on its members' own largest grid, not the stack's padded dendrites (a stack
    # keeps its grid while the members that needed it leave)
    assert _population._bands([(4, 3)] * 5, 16) == [(0, 5, 4, 3)]
    assert _population._bands([(5, 3), (20, 7)] * 60, 16) == [(0, 120, 20, 7)]


def test_a_refilled_fused_stack_stays_sorted_by_band_key(data: core.Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Newcomers joining a fused stack are merged into its sorted run (not appended as a run of
    their own, which after a few refills leaves _bands too many cut points to split), and every
    member that stays keeps its own weights and connections."""
    monkeypatch.setattr(_kernels, "available", lambda device: True)  # a fused stack; no step runs
    shapes = [(5, 4), (2, 2), (3, 4), (5, 2), (2, 3), (4, 4), (3, 2)]
    configs = [dict(n_neurons=n, n_dendrites=d, n_dendrite_inputs=7, seed=s) for s, (n, d) in enumerate(shapes)]
    pop = _population._Population("dendritic_simple", configs, data, 1, BATCH, torch.device("cpu"), 0, 7,
                                  None, None)
    pop.size = 7
    pop._restack([m for m in (pop._take() for _ in range(4)) if m is not None])
    first = pop.stack
    assert first is not None and first.fused
    before = dict(zip((id(m) for m in first.members), first.states(list(range(first.K))), strict=True))
    pop._restack([m for m in (pop._take() for _ in range(3)) if m is not None])
    stack = pop.stack
    assert stack is not None and stack.dims == first.dims, "joined the stack, not rebuilt"
    keys = [_population._band_key(m.arch) for m in stack.members]
    assert keys == sorted(keys) and len(keys) == 7
    after = dict(zip((id(m) for m in stack.members), stack.states(list(range(stack.K))), strict=True))
    for key, old in before.items():
        new = after[key]
        assert torch.equal(new.indices, old.indices)
        assert all(torch.equal(new.params[name], value) for name, value in old.params.items())


def test_bands_cut_the_padded_dendrites_of_members_sorted_by_their_band_key() -> None:
    """Members of few dendrites sorted apart (their power-of-2 tile first) get bands of their
    own dendrites: the rows the products run fall with the dendrites' padding too."""
    rng = __import__("random").Random(0)
    archs = [_population._Arch(in_dim=784, n_classes=10, n=rng.randint(5, 20), d=rng.randint(3, 15), k=8)
             for _ in range(600)]
    archs.sort(key=_population._band_key)
    shapes = [(a.n, a.d) for a in archs]
    bands = _population._bands(shapes, 15)
    assert all((n, d) == tuple(map(max, zip(*shapes[a:b], strict=True))) for a, b, n, d in bands)
    assert min(d for *_, d in bands) <= 8 < max(d for *_, d in bands) == 15
    by_neurons = _population._bands(sorted(shapes), 15)  # sorted by neurons alone
    executed = sum((b - a) * n * d for a, b, n, d in bands)
    assert executed < 0.85 * sum((b - a) * n * d for a, b, n, d in by_neurons)
    assert sum(n * d for n, d in shapes) > 0.6 * executed


def test_a_banded_dense_gradient_reads_back_as_the_whole_grids(data: core.Dataset) -> None:
    """The gradient's positions, band by band, read the same entries as one (K, in, rows) block."""
    configs = [dict(n_neurons=n, n_dendrites=3, n_dendrite_inputs=7, seed=s)
               for s, n in enumerate((4, 2, 2, 5))]
    pop = _population._Population("dendritic_simple", configs, data, 1, BATCH, torch.device("cpu"), 0, 4,
                                  None, None)
    pop.size = 4
    pop._restack([m for m in (pop._take() for _ in range(4)) if m is not None])
    stack = pop.stack
    assert stack is not None and [m.arch.n for m in stack.members] == [2, 2, 4, 5]  # sorted
    K, R, n_in, B = stack.K, stack.dims.rows, stack.dims.in_dim, 6
    whole = stack.flat_t.clone()  # type: ignore[union-attr]
    x = torch.randn(K, B, n_in)
    gz = torch.randn(K, B, R)
    gz.view(K, B, stack.dims.n, 3)[:2, :, 2:] = 0  # rows no member of a band uses
    gz.view(K, B, stack.dims.n, 3)[2, :, 4:] = 0
    full = torch.cat([torch.bmm(x.transpose(1, 2), gz).reshape(-1), torch.zeros(1)])
    stack.bands = [(0, 2, 2, 3), (2, 4, 5, 3)]
    stack.flat_t = None
    stack._index()
    assert stack.grad_size == 2 * n_in * 2 * 3 + 2 * n_in * 5 * 3 and stack.grad_at == [0, 2 * n_in * 6]
    banded = torch.cat([torch.bmm(x[a:b].transpose(1, 2), gz[a:b, :, : n * 3]).reshape(-1)
                        for a, b, n, _ in stack.bands] + [torch.zeros(1)])
    # the same entries (products of other shapes may round differently in the last bit)
    torch.testing.assert_close(banded.take(stack.flat_t), full.take(whole), rtol=1e-6, atol=1e-6)
    assert torch.equal(stack.flat_t == stack.grad_size, whole == whole.max())  # the padding: the sink
    # a fused step's bands align their rows (2 x 3 -> 8, 5 x 3 -> 16): the rows past a band's
    # grid sit in its blocks, and nothing reads the gradient there (NaN in them changes nothing)
    stack.align = 8
    stack.flat_t = None
    stack._index()
    assert stack.grad_size == 2 * n_in * 8 + 2 * n_in * 16 and stack.grad_at == [0, 2 * n_in * 8]
    blocks = []
    for a, b, n, _ in stack.bands:
        rows = stack._rows(n, 3)
        gza = torch.full((b - a, B, rows), float("nan"))
        gza[:, :, : n * 3] = gz[a:b, :, : n * 3]
        g = torch.bmm(x[a:b].transpose(1, 2), gza)
        assert g[:, :, n * 3 :].isnan().all()
        blocks.append(g.reshape(-1))
    aligned = torch.cat([*blocks, torch.zeros(1)])
    torch.testing.assert_close(aligned.take(stack.flat_t), full.take(whole), rtol=1e-6, atol=1e-6)
    # and the dense buffer: each connection's weight lands in its band's row of its member
    stack.buf.zero_()  # type: ignore[union-attr]
    stack._dense()
    for band, (a, b, n, _) in enumerate(stack.bands):
        dense = stack._band_dense(band)
        assert dense.shape == (b - a, stack._rows(n, 3), n_in) and not dense[:, n * 3 :].any()
        for i in range(a, b):
            m = stack.members[i].arch
            w = stack.plain["dw"][i].view(stack.dims.n, 3, -1)[: m.n, : m.d, : m.k]
            at = stack.idx[i].view(stack.dims.n, 3, -1)[: m.n, : m.d, : m.k]  # type: ignore[union-attr]
            want = torch.zeros(n, 3, n_in).scatter_(2, at, w)
            torch.testing.assert_close(dense[i - a, : n * 3].view(n, 3, n_in).float(), want)
    stack._unband()  # the plain step's layout: the whole grid, unaligned
    assert stack.bands == [(0, K, 5, 3)] and torch.equal(stack.flat_t, whole)


_BANDS = """
import torch
import core
from core import _kernels, _population
_kernels.available = lambda device: True  # the fused step on the CPU, its kernels interpreted
_population._BAND_OVERHEAD = 0  # a band for every (dendrite tile, neurons)
_population._GATHER_BELOW = SHARE_OF_SLOTS  # 1: Adam gathers the connections' gradient; 0: a dense take
seen = []
bands = _population._bands
_population._bands = lambda ns, d: seen.append(bands(ns, d)) or seen[-1]
data = core.load_dataset("digits")
configs = [
    dict(n_neurons=9, n_dendrites=3, n_dendrite_inputs=16, steps_to_resample=4, lr=3e-3, seed=1),
    dict(n_neurons=2, n_dendrites=2, n_dendrite_inputs=24, steps_to_resample=7, seed=2),
    dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=12, label_smoothing=0.1, seed=3),
    dict(n_neurons=2, n_dendrites=3, n_dendrite_inputs=9, weight_decay=1e-2, seed=4),
]
results = _population.train_population("dendritic_simple", configs, data, 2, 128, device="cpu")
# a band of its own for the member of 2 dendrites (the others have 3): its own (n, d) grid
assert seen and [(n, d) for _, _, n, d in seen[0]] == [(2, 2), (2, 3), (4, 3), (9, 3)], seen
for cfg, got in zip(configs, results, strict=True):
    c = dict(cfg)
    lr, seed = c.pop("lr", 1e-3), c.pop("seed")
    recipe = {k: c.pop(k) for k in ("weight_decay", "label_smoothing") if k in c}
    model = core.create_model("dendritic_simple", seed=seed, in_dim=data.in_dim,
                              n_classes=data.n_classes, **c)
    want = core.train_model(model, data, 2, lr, recipe.get("weight_decay", 0.0), 128, device="cpu",
                            seed=seed, label_smoothing=recipe.get("label_smoothing", 0.0))
    for g, w in zip(got.history, want.history, strict=True):
        for key in ("train_loss", "val_loss", "test_loss"):
            assert abs(g[key] - w[key]) <= 1e-4 * abs(w[key]), (key, g[key], w[key])
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(got.state_dict[name], value, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(got.state_dict[name], value), name  # resampled alike
print("same")
"""


@pytest.mark.parametrize("gather", [1.0, 0.0])
def test_members_in_several_bands_match_train_model_in_the_triton_interpreter(gather: float) -> None:
    """The banded fused step (resampling, label smoothing, weight decay) on the CPU, with the
    connections' Adam and with the dense take."""
    _interpret(_BANDS.replace("SHARE_OF_SLOTS", repr(gather)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton head runs on CUDA only")
def test_members_in_several_bands_match_train_model_on_cuda(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without resampling: on CUDA the bands' products round differently in the last bit, and
    resampling's choice of the weakest weights can then flip between near-equal ones (the
    interpreter test above checks resampling in bands exactly, on the CPU)."""
    monkeypatch.setattr(_population, "_BAND_OVERHEAD", 0)  # a band for every (dendrite tile, neurons)
    seen: list[list[tuple[int, int, int]]] = []
    bands = _population._bands
    monkeypatch.setattr(_population, "_bands", lambda ns, d: seen.append(bands(ns, d)) or seen[-1])
    never = dict(steps_to_resample=10**6)
    configs = [
        dict(n_neurons=9, n_dendrites=3, n_dendrite_inputs=16, lr=3e-3, seed=1, **never),
        dict(n_neurons=2, n_dendrites=2, n_dendrite_inputs=24, seed=2, **never),
        dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=12, label_smoothing=0.1, seed=3, **never),
        dict(n_neurons=2, n_dendrites=3, n_dendrite_inputs=9, weight_decay=1e-2, seed=4, **never),
    ]
    results = train_population("dendritic_simple", configs, data, 2, BATCH, device="cuda")
    assert seen and [(n, d) for _, _, n, d in seen[0]] == [(2, 2), (2, 3), (4, 3), (9, 3)]
    # the bands' products have other shapes than train_model's, so cuBLAS rounds them
    # differently; over 2 epochs of Adam the weights drift by up to ~5e-5 (measured on an H200)
    _assert_like_train_model_on_cuda(configs, results, data, rtol=1e-3, atol=2e-4)
    bf = train_population("dendritic_simple", configs, data, 2, BATCH, device="cuda", precision="bf16")
    for x, y in zip(results, bf, strict=True):
        assert y.status == "completed" and abs((x.test_accuracy or 0) - (y.test_accuracy or 0)) < 0.05


def test_the_plan_workers_run_on_one_intra_op_thread_and_the_callers_count_stays() -> None:
    import threading

    before = torch.get_num_threads()
    pool = _population._serial_pool(3, "test-plans")

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    try:
        counts = [f.result() for f in [pool.submit(torch.get_num_threads) for _ in range(9)]]
        nices = [f.result() for f in [pool.submit(nice) for _ in range(9)]]
    finally:
        pool.shutdown()
    assert counts == [1] * 9
    # nicer than the caller (the main thread launches the device's steps), up to the limit
    assert nices == [min(19, nice() + _population._PLAN_NICE)] * 9 and _population._PLAN_NICE > 0
    assert torch.get_num_threads() == before
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [before]  # threads started afterwards get the process's count


_AHEAD = """
import torch
import core
from core import _kernels, _population
_kernels.available = lambda device: True  # the fused step on the CPU, its kernels interpreted
_population._BAND_OVERHEAD = 0  # two bands: two heads
_population._GATHER_BELOW = 1.01  # the connections' Adam besides the rows'
launched = []
launch = _kernels._launch
_kernels._launch = lambda kernel, grid, *a, **k: (launched.append(_kernels.ahead()), launch(kernel, grid, *a, **k))
data = core.load_dataset("digits")
configs = [dict(n_neurons=n, n_dendrites=d, n_dendrite_inputs=9, weight_decay=1e-2, seed=s)
           for s, (n, d) in enumerate([(2, 2), (5, 3), (5, 3)])]
pop = _population._Population("dendritic_simple", configs, data, 1, 16, torch.device("cpu"), 0, 3, None, None)
pop.size = 3
pop._restack([m for m in (pop._take() for _ in range(3)) if m is not None])
stack = pop.stack
assert launched == [], launched  # the members' draws launch no kernel
assert stack.fused and stack.fast_adam and len(stack.bands) == 2, stack.bands
before = stack.snapshot()
stack._dense()  # the dense matrix as every step writes it first, from the weights
buf = stack.buf.clone()
x = data.x_train[:16].float().expand(3, 16, -1).contiguous()
y = data.y_train[:16].expand(3, 16).contiguous()
stack.compile_ahead(x, y)
# two heads, both Adams and the resampling's scores: compiled, not run
assert launched == [True, True, True, True, True], launched
for t, s in zip((stack.p, stack.m, stack.v, stack.idx, stack.steps), before[:5], strict=True):
    assert torch.equal(t, s)
assert torch.equal(stack.buf, buf)
launched.clear()
stack.train_step(x, y)  # the step itself still launches (and changes the weights)
assert launched == [False, False, False, False] and not torch.equal(stack.p, before[0])
assert int(stack.steps.max()) == int(before[4].max()) + 1
print("same")
"""


def test_compiling_the_fused_step_ahead_launches_nothing_and_changes_nothing_in_the_interpreter() -> None:
    """The trace of the step that compiles its kernels (all at once, in threads, before the
    capture) leaves the weights, moments, connections, step counts and dense matrix as they were."""
    _interpret(_AHEAD)


_EVAL_FALLBACK = """
import torch
import core
from core import _kernels, _population
_kernels.available = lambda device: True  # the fused step on the CPU, its kernels interpreted
_population._BAND_OVERHEAD = 0  # two bands, each on rows aligned past its grid
data = core.load_dataset("digits")
configs = [dict(n_neurons=n, n_dendrites=d, n_dendrite_inputs=9, seed=s)
           for s, (n, d) in enumerate([(2, 2), (5, 3), (5, 3)])]
pop = _population._Population("dendritic_simple", configs, data, 1, 16, torch.device("cpu"), 0, 3, None, None)
pop.size = 3
pop._restack([m for m in (pop._take() for _ in range(3)) if m is not None])
stack = pop.stack
assert stack.fused and len(stack.bands) == 2 and stack.align == 8
x, y = data.x_val.float(), data.y_val
fused = stack.evaluate(x, y)
def broken(*args, **kwargs):
    raise RuntimeError("no ptxas")
_kernels.soma_eval = broken
plain = stack.evaluate(x, y)  # the same sums from the plain path, on the whole grid
assert not stack.fused and stack.align == 1 and stack.whole_grid and _kernels._DISABLED
assert stack.grad_size == 3 * stack.dims.in_dim * stack.dims.rows  # the (K, in, rows) layout
torch.testing.assert_close(plain[0], fused[0], rtol=1e-5, atol=1e-5)
assert torch.equal(plain[1], fused[1]) and plain[1].sum() > 0
print("same")
"""


def test_an_evaluation_whose_kernel_fails_gives_the_same_sums_on_the_plain_path_in_the_interpreter() -> None:
    """A fused stack whose evaluation kernel fails leaves the fused layout (its aligned bands)
    for the whole grid and evaluates there: the same loss sums and counts."""
    _interpret(_EVAL_FALLBACK)


_COLD = """
import os, sys, torch
import core
from core import _kernels, _population
tri = _kernels._triton()
def compiled():
    return sum(len(c[0]) for kernel in tri[1:] for c in kernel.device_caches.values())
seen = []
capture = _population.capture_step
def counted(body, device, generators=()):
    seen.append(compiled())
    graph = capture(body, device, generators)
    seen.append(compiled())
    return graph
_population.capture_step = counted
_population._BAND_OVERHEAD = 0
if sys.argv[1] == "off":
    _population._Stack.compile_ahead = lambda self, xb, yb: None
data = core.load_dataset("digits")
configs = [dict(n_neurons=n, n_dendrites=d, n_dendrite_inputs=9, seed=s)
           for s, (n, d) in enumerate([(2, 2), (9, 3), (5, 3)])]
res = _population.train_population("dendritic_simple", configs, data, 1, 128, device="cuda")
seen.append(compiled())  # after the epoch's evaluation, which runs the step's heads' kernels
torch.save([r.state_dict for r in res], sys.argv[2])
print("seen", seen)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles for CUDA only")
def test_a_cold_cache_compiles_the_fused_step_before_its_capture_and_trains_the_same_on_cuda(tmp_path: Path) -> None:
    """A fresh process and an empty Triton cache: with the kernels compiled ahead the capture's
    warm-up step compiles nothing more; the members' weights equal a run that compiles as it goes."""
    out = {}
    for mode in ("on", "off"):
        env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / f"cache-{mode}"))
        done = subprocess.run([sys.executable, "-c", _COLD, mode, str(tmp_path / f"{mode}.pt")], env=env,
                              cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        out[mode] = eval(done.stdout.split("seen", 1)[1])  # [compiled at the capture's start, at its end]
    # two heads, Adam and the resampling's scores, all before it; the evaluation compiled
    # nothing of its own (nor did the members' draws, which use no kernel)
    assert out["on"][0] >= 4 and out["on"][0] == out["on"][1] == out["on"][-1]
    assert out["off"][0] == 0 and out["off"][1] >= 3
    on, off = torch.load(tmp_path / "on.pt"), torch.load(tmp_path / "off.pt")
    for a, b in zip(on, off, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_population_on_the_second_gpu_makes_it_the_current_device_while_it_trains(data: core.Dataset) -> None:
    """Triton launches on the current device: a worker given cuda:1 must train there."""
    seen: list[int] = []
    res = train_population("dendritic_simple", [dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=16, seed=0)],
                           data, 1, BATCH, device="cuda:1",
                           on_epoch=lambda i, e, m: seen.append(torch.cuda.current_device()))
    assert seen == [1] and res[0].status == "completed" and torch.cuda.current_device() == 0
