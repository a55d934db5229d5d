"""The seed's analysis utilities as plotly figures: eigenvalues, dendritic weight images, curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._layers import DendriticLayer

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from ._train import TrainResult

__all__ = [
    "calculate_eigenvalues",
    "plot_eigenvalues",
    "dendritic_weight_image",
    "plot_dendritic_weights_single_image",
    "plot_dendritic_weights_full_model",
    "plot_training_curves",
]


def _dense_weight(layer: nn.Module) -> np.ndarray:
    if isinstance(layer, DendriticLayer):
        dense = torch.zeros(layer.weight.shape[0], layer.in_dim, device=layer.weight.device)
        dense.scatter_(1, layer.indices, layer.weight.detach())
        return dense.cpu().numpy()
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().cpu().numpy()
    raise TypeError(f"expected a DendriticLayer or nn.Linear, got {type(layer).__name__}")


def calculate_eigenvalues(layer: nn.Module) -> np.ndarray:
    """Eigenvalues of W W^T for a layer's (dense-equivalent) weight matrix, largest first."""
    w = _dense_weight(layer)
    return np.sort(np.linalg.eigvalsh(w @ w.T))[::-1]


def plot_eigenvalues(layers: Mapping[str, nn.Module]) -> go.Figure:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, layer in layers.items():
        ev = calculate_eigenvalues(layer)
        fig.add_trace(go.Scatter(y=ev, mode="lines+markers", name=name))
    fig.update_layout(title="Eigenvalue spectrum of W Wᵀ", xaxis_title="index",
                      yaxis_title="eigenvalue", yaxis_type="log")
    return fig


def dendritic_weight_image(
    layer: DendriticLayer, neuron: int = 0, image_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Summed input weights of one neuron's dendrites, laid out as the input image."""
    if not 0 <= neuron < layer.n_neurons:
        raise ValueError(f"neuron must be in [0, {layer.n_neurons}), got {neuron}")
    w = _dense_weight(layer)
    rows = w[neuron * layer.n_dendrites : (neuron + 1) * layer.n_dendrites].sum(0)
    if image_shape is None:
        side = int(math.isqrt(layer.in_dim))
        image_shape = (side, layer.in_dim // side)
    return rows.reshape(image_shape)


def plot_dendritic_weights_single_image(
    layer: DendriticLayer, neuron: int = 0, image_shape: tuple[int, int] | None = None
) -> go.Figure:
    import plotly.graph_objects as go

    img = dendritic_weight_image(layer, neuron, image_shape)
    lim = float(np.abs(img).max()) or 1.0
    fig = go.Figure(go.Heatmap(z=img[::-1], colorscale="RdBu", zmin=-lim, zmax=lim))
    fig.update_layout(title=f"Dendritic input weights of neuron {neuron}",
                      yaxis_scaleanchor="x", width=420, height=400)
    return fig


def plot_dendritic_weights_full_model(
    layer: DendriticLayer, image_shape: tuple[int, int] | None = None, max_neurons: int = 16
) -> go.Figure:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = min(layer.n_neurons, max_neurons)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"neuron {i}" for i in range(n)])
    for i in range(n):
        img = dendritic_weight_image(layer, i, image_shape)
        fig.add_trace(go.Heatmap(z=img[::-1], colorscale="RdBu", showscale=False),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title="Dendritic input weights per neuron", height=220 * rows + 80)
    return fig


def plot_training_curves(
    results: Mapping[str, TrainResult] | Sequence[TrainResult] | TrainResult,
    metrics: Sequence[str] = ("train_loss", "val_loss", "val_accuracy", "test_accuracy"),
) -> go.Figure:
    """Per-epoch curves of one or several training results (a dict of name -> result)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ._train import TrainResult as _TR

    if isinstance(results, _TR):
        results = {results.name or "model": results}
    elif not isinstance(results, Mapping):
        results = {r.name or f"model {i}": r for i, r in enumerate(results)}
    shown = [m for m in metrics if any(h.get(m) is not None for r in results.values() for h in r.history)]
    fig = make_subplots(rows=1, cols=max(1, len(shown)), subplot_titles=shown)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for j, (name, res) in enumerate(results.items()):
        epochs = [h["epoch"] for h in res.history]
        for c, m in enumerate(shown):
            fig.add_trace(
                go.Scatter(x=epochs, y=[h.get(m) for h in res.history], name=name,
                           legendgroup=name, showlegend=c == 0,
                           line={"color": palette[j % len(palette)]}),
                row=1, col=c + 1,
            )
    fig.update_layout(title="Training curves", height=380)
    return fig


def figure_to_html(fig: Any, path: str) -> None:
    """Write a figure as a standalone HTML file (plotly.js inlined: opens offline)."""
    fig.write_html(path, include_plotlyjs=True, full_html=True)
