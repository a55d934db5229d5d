"""Bio rules for stacked populations: each member's rules applied to the flat buffers at once.

Shared by :func:`core.train_population` (dendritic MLPs: the readout) and
:func:`core.train_recurrent_population` (the readout, and a DIRU layer's integration and
global gate). A member is converted with :class:`~core.BioConverter` exactly as a lone trial
is; the batched rules then do what :class:`~core.BioStepHook` does in ``train_model``, member
by member, and the rare steps that draw random numbers run that member's own BioModules
with its own generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ._bio import (
    _ACTIVE_EPS,
    _TINY,
    BioConfig,
    BioConverter,
    BioModule,
    BioStepHook,
    Distribution,
    bio_layers,
)

__all__ = ["MemberBio", "BioPack", "convert_member"]


@dataclass(eq=False)
class MemberBio:
    """A member's bio rules: its converted module's layers, their BioModules, its generator.

    The BioModules hold the member's rule state (rate factors, Dale signs, activity) while it
    is outside a stack; inside one, :class:`BioPack` holds it and writes it back when the
    stack changes. ``gen`` carries on the random stream that conversion started, so the
    member draws what ``torch.manual_seed(seed)``, ``BioConverter`` and ``train_model`` with
    a ``BioStepHook`` would draw from the global generator.
    """

    config: BioConfig
    hook: BioStepHook
    layers: list[tuple[str, nn.Linear, BioModule]]  # (role, layer, its rules) in module order
    gen: torch.Generator

    def due(self, step: int) -> tuple[bool, bool]:
        """(fuzzy rates update, rejuvenation) due after optimizer step ``step``."""
        c, hook = self.config, self.hook
        update = (hook.update_rates and c.fuzzy_lr_dynamic and step % c.fuzzy_lr_update_freq == 0
                  and c.distribution in (Distribution.TEMPORAL, Distribution.ACTIVITY))
        every = hook.rejuvenate_every
        return update, every is not None and step % every == 0


def convert_member(net: nn.Module, options: dict[str, Any], seed: int,
                   role: Callable[[str], str]) -> MemberBio:
    """BioConverter on a member's module from ``torch.manual_seed(seed)``, as a lone trial would.

    ``role(name)`` is the stacked name of the converted layer ``name`` (a ValueError if the
    trainer does not stack rules on it); the readout's role is ``"wo"``.
    """
    if not isinstance(options, dict):
        raise TypeError(f"bio must be a dict of BioConfig and BioStepHook options, got {options!r}")
    hook_keys = {f.name for f in fields(BioStepHook) if f.init}
    hook = BioStepHook(**{k: v for k, v in options.items() if k in hook_keys})
    config = BioConfig(**{k: v for k, v in options.items() if k not in hook_keys})
    if hook.dales and not config.apply_dales_principle:
        raise ValueError("BioStepHook(dales=True) needs apply_dales_principle=True")
    gen = torch.Generator()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        BioConverter(config)(net)
        gen.set_state(torch.default_generator.get_state())
    layers = []
    for name, layer in bio_layers(net):
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"bio rules on {type(layer).__name__} layer {name!r} are not stacked")
        bio = layer._modules["bio_mod"]
        assert isinstance(bio, BioModule)
        layers.append((role(name), layer, bio))
    return MemberBio(config, hook, layers, gen)


class BioPack:
    """The bio rules of a stack's members, applied to the flat buffers for all of them at once.

    Each converted layer ("role": the readout, and a DIRU layer's integration and global gate)
    is gathered from the flat buffers as ``(K, rows, cols)`` padded to the largest member;
    ``idx`` holds the flat positions (padding points at position 0, the first input weight,
    which is never a converted weight, and reads and writes back its own value). Rules act
    per member with per-member options; the gradient rules and Dale's principle are batched,
    while the rare steps that draw from a member's generator (dynamic rate updates,
    rejuvenation) run that member's BioModule methods on the CPU with its generator, so each
    member draws exactly what it would draw alone.
    """

    def __init__(self, stack: Any, positions: Callable[[Any], dict[str, torch.Tensor]], n_out: int) -> None:
        """``stack`` has ``K``, ``p`` (the flat ``(K, P)`` parameters) and ``members`` (each
        with ``bio`` and ``arch``); ``positions(arch)`` gives each role's weight positions in
        a member's flat row, in the layer's shape; ``n_out`` is the readout's width."""
        self.stack = stack
        members = stack.members
        K, dev = len(members), stack.p.device
        self.bios = [m.bio for m in members]
        self.positions = [positions(m.arch) if m.bio else {} for m in members]
        shapes: dict[str, tuple[int, int]] = {}
        for b in self.bios:
            for role, layer, _ in b.layers if b else []:
                r, c = layer.weight.shape
                rr, cc = shapes.get(role, (0, 0))
                shapes[role] = (max(r, rr), max(c, cc))
        self.roles = list(shapes)
        self.idx: dict[str, torch.Tensor] = {}
        self.real: dict[str, torch.Tensor] = {}
        self.f: dict[str, torch.Tensor] = {}
        self.sign: dict[str, torch.Tensor] = {}
        dale = torch.zeros(K, len(self.roles), dtype=torch.bool)
        for j, role in enumerate(self.roles):
            R, C = shapes[role]
            idx = torch.zeros(K, R, C, dtype=torch.long)
            f = torch.zeros(K, R, C)
            sign = torch.ones(K, 1, C)
            for k, b in enumerate(self.bios):
                for rl, layer, bio in b.layers if b else []:
                    if rl != role:
                        continue
                    r, c = layer.weight.shape
                    idx[k, :r, :c] = self.positions[k][role]
                    f[k, :r, :c] = bio.fuzzy_lr
                    if bio.dale_sign is not None and b is not None and b.hook.dales is not False:
                        sign[k, 0, :c] = bio.dale_sign.view(-1)
                        dale[k, j] = True
            self.idx[role] = idx.view(K, -1).to(dev)
            self.real[role] = (idx != 0).to(dev)
            self.f[role] = f.to(dev)
            self.sign[role] = sign.to(dev)
        self.dale = dale.to(dev)
        self.any_dale = bool(dale.any())

        def vec(get: Callable[[MemberBio], float]) -> torch.Tensor:
            return torch.tensor([get(b) if b else 0.0 for b in self.bios],
                                dtype=torch.float32, device=dev).view(K, 1, 1)

        self.fuzzy = vec(lambda b: float(b.hook.fuzzy)).bool()
        self.crystal = vec(lambda b: float(b.hook.crystallize)).bool()
        self.volume = vec(lambda b: float(b.hook.volume_dependent)).bool()
        self.scale = vec(lambda b: float(b.hook.scale_grad and b.config.homeostatic_strength > 0)).bool()
        self.any_volume = any(b is not None and b.hook.volume_dependent for b in self.bios)
        self.any_scale = any(b is not None and b.hook.scale_grad for b in self.bios)
        self.damp = vec(lambda b: b.config.dampening_factor)
        self.thresh = vec(lambda b: b.config.crystal_thresh)
        self.base_lr = vec(lambda b: b.config.base_lr)
        self.stab = vec(lambda b: b.config.stability_factor)
        self.var = vec(lambda b: b.config.lr_variability)
        self.strength = vec(lambda b: b.config.homeostatic_strength)
        self.target = vec(lambda b: math.nan if b.config.homeostatic_target is None
                          else b.config.homeostatic_target).view(K, 1)
        # The readout's activity (the one converted layer a recurrent model calls as a module,
        # so the only one whose forward hook observes anything in a lone trial).
        assert all(b.layers[0][0] == "wo" for b in self.bios if b)
        tracks = [b is not None and b.layers[0][2].tracks_activity for b in self.bios]
        self.tracks = torch.tensor(tracks, device=dev).view(K, 1)
        self.any_tracks = any(tracks)
        self.keep = vec(lambda b: b.config.homeostatic_momentum).view(K, 1)
        readouts = [b.layers[0][2] if b else None for b in self.bios]
        self.level = torch.stack([r.activity_level if r is not None else torch.zeros(n_out)
                                  for r in readouts]).to(dev)
        self.rate = torch.stack([r.activity_rate if r is not None else torch.zeros(n_out)
                                 for r in readouts]).to(dev)
        self.observed = torch.tensor([r.observed if r is not None else 0 for r in readouts],
                                     dtype=torch.float32, device=dev).view(K, 1)

        # Weight splitting: the readout's outputs in runs of Gamma, each run's sum repeated over
        # it (the forward hook a lone trial's converted readout runs; members grouped by their
        # Gamma and activation function). The one converted layer whose hooks a lone trial
        # calls is the readout (the others' weights are used directly), so it is the one here.
        groups: dict[tuple[int, int], tuple[int, Any, list[int]]] = {}
        for k, b in enumerate(self.bios):
            if b is None or not b.layers[0][2].splits:
                continue
            c = b.config
            act = c.weight_splitting_activation_function
            groups.setdefault((c.weight_splitting_Gamma, id(act)), (c.weight_splitting_Gamma, act, []))[2].append(k)
        self.splits = []
        for gamma, act, rows in groups.values():
            mask = torch.zeros(K, dtype=torch.bool)
            mask[rows] = True
            self.splits.append((gamma, act, mask.to(dev)))

    def split(self, out: torch.Tensor) -> torch.Tensor:
        """The readout's outputs ``(K, ...)`` after each member's weight splitting (if any)."""
        for gamma, act, mask in self.splits:
            y = act(out) if act is not None else out
            runs = y.unflatten(-1, (y.shape[-1] // gamma, gamma)).sum(-1).repeat_interleave(gamma, dim=-1)
            out = torch.where(mask.view(-1, *([1] * (out.dim() - 1))), runs, out)
        return out

    # -- in the step ----------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, out: torch.Tensor) -> None:
        """Fold a training batch of the readout's outputs into each member's activity."""
        if not self.any_tracks:
            return
        K, n_out = out.shape[0], out.shape[-1]
        y = out.detach().abs().reshape(K, -1, n_out)
        level = y.mean(1)
        rate = (y > _ACTIVE_EPS).to(y.dtype).mean(1)
        first = self.observed == 0
        new_level = torch.where(first, level, torch.lerp(self.level, level, 1.0 - self.keep))
        new_rate = torch.where(first, rate, torch.lerp(self.rate, rate, 1.0 - self.keep))
        self.level = torch.where(self.tracks, new_level, self.level)
        self.rate = torch.where(self.tracks, new_rate, self.rate)
        self.observed += self.tracks.float()

    def _draws(self) -> dict[str, torch.Tensor]:
        """Volume-dependent plasticity's normal draws, per member in its layers' order."""
        K = self.stack.K
        out = {role: torch.zeros(K, *self.f[role].shape[1:]) for role in self.roles}
        for k, b in enumerate(self.bios):
            if b is None or not b.hook.volume_dependent:
                continue
            for role, layer, _ in b.layers:
                r, c = layer.weight.shape
                out[role][k, :r, :c] = torch.randn(r, c, generator=b.gen)
        return {role: t.to(self.stack.p.device) for role, t in out.items()}

    @torch.no_grad()
    def after_backward(self, g: torch.Tensor, p: torch.Tensor) -> None:
        """Volume-dependent lr, fuzzy rates, crystallisation, homeostasis, on the gradient."""
        draws = self._draws() if self.any_volume else {}
        for role in self.roles:
            idx = self.idx[role]
            shape = self.f[role].shape
            real = self.real[role]
            orig = g.gather(1, idx).view(shape)
            w = p.gather(1, idx).view(shape)
            gr = orig
            if self.any_volume:
                mag = w.abs()
                mean = self.base_lr * torch.exp(-self.stab * mag / (1.0 + mag))
                factor = (mean * (1.0 + self.var * draws[role])).abs()
                gr = torch.where(self.volume, gr * factor, gr)
            gr = torch.where(self.fuzzy, gr * self.f[role], gr)
            ga, wa = gr.abs(), w.abs() * real
            mean_w = wa.sum((1, 2), keepdim=True) / real.sum((1, 2), keepdim=True).clamp_min(1)
            settled = (ga / wa.clamp_min(_TINY) < self.thresh) | (ga > mean_w)
            self.f[role] = torch.where(self.crystal & settled, self.f[role] * self.damp, self.f[role])
            if role == "wo" and self.any_scale:
                a = self.level
                target = torch.where(self.target.isnan(), a.mean(1, keepdim=True), self.target)
                d = torch.log((a + _TINY) / (target + _TINY)).clamp(-1.0, 1.0)
                on = self.scale & (self.observed > 0).view(-1, 1, 1)
                gr = torch.where(on, gr + self.strength * d.unsqueeze(2) * w, gr)
            # padding writes position 0 its own value back (see the class docstring)
            g.scatter_(1, idx, torch.where(real, gr, orig).reshape(g.shape[0], -1))

    @torch.no_grad()
    def after_step(self, p: torch.Tensor, steps: list[int]) -> None:
        """Rate updates and rejuvenation where due (on the CPU, per member), then Dale's principle."""
        due = [k for k, (b, s) in enumerate(zip(self.bios, steps, strict=True)) if b and any(b.due(s))]
        for k in due:
            self._alone(k, p, steps[k])
        if not self.any_dale:
            return
        skip = torch.zeros(self.stack.K, 1, 1, dtype=torch.bool, device=p.device)
        if due:
            skip[due] = True
        for j, role in enumerate(self.roles):
            idx = self.idx[role]
            shape = self.f[role].shape
            w = p.gather(1, idx).view(shape)
            s = self.sign[role]
            on = self.dale[:, j].view(-1, 1, 1) & ~skip & self.real[role]
            p.scatter_(1, idx, torch.where(on, (w * s).clamp_(min=0.0) * s, w).view(p.shape[0], -1))

    def _alone(self, k: int, p: torch.Tensor, step: int) -> None:
        """BioStepHook.after_step for member ``k`` through its own BioModules, with its generator."""
        b = self.bios[k]
        assert b is not None
        update, rejuvenate = b.due(step)
        self._load(k)
        row = p[k].cpu()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.set_state(b.gen.get_state())
            for role, layer, bio in b.layers:
                layer.weight.copy_(row.take(self.positions[k][role]))
                bio.steps = step - 1
                if update:
                    bio.update_fuzzy_learning_rates(layer)
                if rejuvenate:
                    bio.rejuvenate_weights(layer)
                if b.hook.dales is not False:
                    bio.enforce_dales_principle(layer)
                row.put_(self.positions[k][role], layer.weight.detach())
            b.gen.set_state(torch.default_generator.get_state())
        p[k].copy_(row.to(p.device))
        for role, layer, bio in b.layers:
            r, c = layer.weight.shape
            self.f[role][k, :r, :c] = bio.fuzzy_lr.to(p.device)

    # -- in and out of the stack ----------------------------------------------------------
    def _load(self, k: int) -> None:
        """Member ``k``'s rule state from the stack into its BioModules."""
        b = self.bios[k]
        assert b is not None
        for role, layer, bio in b.layers:
            r, c = layer.weight.shape
            bio.fuzzy_lr.copy_(self.f[role][k, :r, :c])
        readout = b.layers[0][2]
        readout.activity_level.copy_(self.level[k])
        readout.activity_rate.copy_(self.rate[k])
        readout.observed = int(self.observed[k])

    def flush(self, steps: list[int]) -> None:
        """Every member's rule state back into its BioModules (before the stack changes)."""
        for k, b in enumerate(self.bios):
            if b is None:
                continue
            self._load(k)
            for _, _, bio in b.layers:
                bio.steps = steps[k] if b.hook.update_rates else 0

    def snapshot(self) -> tuple[Any, ...]:
        return ({r: t.clone() for r, t in self.f.items()}, self.level.clone(), self.rate.clone(),
                self.observed.clone(), [b.gen.get_state() if b else None for b in self.bios])

    def restore(self, snap: tuple[Any, ...]) -> None:
        f, self.level, self.rate, self.observed, gens = snap
        self.f = dict(f)
        for b, state in zip(self.bios, gens, strict=True):
            if b is not None:
                b.gen.set_state(state)
