"""The seed-style baseline every speed figure is compared with, measured in the same run.

A DataLoader over CPU tensors (shuffled, collated per batch and copied to the device each
step) and a dendritic layer stored as a dense ``(n*d, in_dim)`` weight times a 0/1 mask,
trained with Adam; resampling moves mask entries every ``steps_to_resample`` steps.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def cuda_seconds(fn: Any, reps: int = 10) -> float:
    """Device seconds of one ``fn()``: the median of ``reps`` CUDA-event timings (the upper
    one of an even count), after three warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


class MaskedDendriticLayer(nn.Module):
    def __init__(self, in_dim: int, n_neurons: int, k: int, n_dendrites: int,
                 resample: bool = True, p: float = 0.25, steps: int = 128) -> None:
        super().__init__()
        nd = n_neurons * n_dendrites
        self.n, self.d, self.k, self.resample, self.p, self.steps = n_neurons, n_dendrites, k, resample, p, steps
        mask = torch.zeros(nd, in_dim)
        for r in range(nd):
            mask[r, torch.randperm(in_dim)[:k]] = 1.0
        self.register_buffer("mask", mask)
        b = 1 / math.sqrt(k)
        self.weight = nn.Parameter(torch.empty(nd, in_dim).uniform_(-b, b))
        self.bias = nn.Parameter(torch.empty(nd).uniform_(-b, b))
        bs = 1 / math.sqrt(n_dendrites)
        self.soma_w = nn.Parameter(torch.empty(n_neurons, n_dendrites).uniform_(-bs, bs))
        self.soma_b = nn.Parameter(torch.empty(n_neurons).uniform_(-bs, bs))
        self.n_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = F.leaky_relu(x @ (self.weight * self.mask).t() + self.bias, 0.1)
        d = d.view(-1, self.n, self.d)
        return F.leaky_relu((d * self.soma_w).sum(-1) + self.soma_b, 0.1)

    @torch.no_grad()
    def step(self) -> None:
        self.n_steps += 1
        if not self.resample or self.n_steps % self.steps:
            return
        m = math.floor(self.k * self.p)
        w = (self.weight * self.mask).abs() + (1 - self.mask) * 1e9
        weakest = w.topk(m, dim=1, largest=False).indices
        self.mask.scatter_(1, weakest, 0.0)
        free = torch.rand_like(self.mask) - self.mask * 2
        new = free.topk(m, dim=1).indices
        self.mask.scatter_(1, new, 1.0)


def seed_style_train(data: Any, n_neurons: int, n_dendrites: int, k: int, n_epochs: int,
                     batch_size: int, lr: float, device: torch.device, seed: int = 0) -> dict[str, float]:
    """Train the seed-style way; returns seconds per epoch and final test accuracy."""
    torch.manual_seed(seed)
    layer = MaskedDendriticLayer(data.in_dim, n_neurons, k, n_dendrites)
    model = nn.Sequential(layer, nn.Linear(n_neurons, data.n_classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=batch_size, shuffle=True)
    times = []
    for _ in range(n_epochs):
        t0 = time.perf_counter()
        model.train()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            layer.step()
        # the seed evaluates on the test loader every epoch too
        model.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=1000):
                correct += int((model(xb.to(device)).argmax(1) == yb.to(device)).sum())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"seconds_per_epoch": sum(times) / len(times), "test_accuracy": correct / len(data.x_test)}


def func_ensemble_train(data: Any, k: int, sizes: dict[str, int], n_epochs: int, batch_size: int,
                        lr: float, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """The torch.func ensemble a PyTorch user would write: stacked state, vmap, one fused Adam.

    ``k`` members of ``dendritic_simple`` (seeds ``seed..seed+k-1``) stacked with
    ``stack_module_state``, called through ``functional_call`` under ``vmap``, one Adam over
    the stacked tensors (``fused=True`` on CUDA), each member with its own batch order. No
    synaptic resampling (that favours it: it skips work the population does). Evaluates the
    validation and test splits every epoch, as the population does. Returns the whole
    call's seconds (set-up included), the last epoch's seconds and the final test accuracies.
    """
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    import core

    t_start = time.perf_counter()
    models = [core.create_model("dendritic_simple", seed=seed + i, in_dim=data.in_dim,
                                n_classes=data.n_classes, **sizes).to(device) for i in range(k)]
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = copy.deepcopy(models[0]).to("meta")
    leaves = list(params.values())
    opt = torch.optim.Adam(leaves, lr=lr, fused=device.type == "cuda")
    d = data.to(device)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(k)]

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    batched = vmap(one)  # every member its own batch
    shared = vmap(one, in_dims=(0, 0, None))  # evaluation: one batch for all
    n = len(d.x_train)
    epoch_seconds = 0.0
    accs = torch.zeros(k)
    for _ in range(n_epochs):
        t0 = time.perf_counter()
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
        for i in range(0, n, batch_size):
            idx = perms[:, i : i + batch_size]
            xb, yb = d.x_train[idx], d.y_train[idx]
            out = batched(params, buffers, xb)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1), reduction="none")
            opt.zero_grad(set_to_none=True)
            loss.view(k, -1).mean(1).sum().backward()
            opt.step()
        with torch.no_grad():
            for x, y in ((d.x_val, d.y_val), (d.x_test, d.y_test)):
                correct = torch.zeros(k, device=device)
                for j in range(0, len(x), 2048):
                    correct += (shared(params, buffers, x[j : j + 2048]).argmax(2) == y[j : j + 2048]).sum(1)
            accs = (correct / len(x)).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
    return {"seconds": time.perf_counter() - t_start, "last_epoch_seconds": epoch_seconds,
            "test_accuracy": accs.tolist()}
