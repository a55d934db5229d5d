"""Image model families (ResNet-18/50 for 32x32 inputs, a small CNN) with exact parameter counts.

Image families take ``(N, C, H, W)`` batches, so load their datasets with ``flatten=False``.
``in_channels`` is ``Dataset.input_shape[0]``, the channel axis the loaders keep: 1 for
Fashion-MNIST, MNIST and digits, 3 for CIFAR-10/100; ``n_classes`` is ``Dataset.n_classes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ._registry import register_model

if TYPE_CHECKING:
    import torchvision  # type: ignore[import-untyped]


def _models() -> Any:
    """``torchvision.models``, imported when a ResNet is built: importing torchvision pulls in
    torch._dynamo, ~3 s of every process's start (every worker, CLI call and server) for two
    families that most studies never build."""
    import torchvision  # type: ignore[import-untyped]

    return torchvision.models

__all__: list[str] = []

# torchvision's stage widths, and the blocks per stage of the two depths offered here.
_STAGES = (64, 128, 256, 512)
_RESNET18 = (2, 2, 2, 2)
_RESNET50 = (3, 4, 6, 3)


def _check_positive(**sizes: Any) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k  # every conv in these families is bias-free (BatchNorm follows)


def _bn(c: int) -> int:
    return 2 * c


def _resnet_count(
    blocks: tuple[int, ...], bottleneck: bool, in_channels: int, n_classes: int
) -> int:
    expansion = 4 if bottleneck else 1
    total = _conv(in_channels, 64, 3) + _bn(64)
    width = 64
    for stage, (planes, n) in enumerate(zip(_STAGES, blocks, strict=True)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            out = planes * expansion
            if bottleneck:
                total += _conv(width, planes, 1) + _conv(planes, planes, 3) + _conv(planes, out, 1)
                total += _bn(planes) * 2 + _bn(out)
            else:
                total += _conv(width, planes, 3) + _conv(planes, planes, 3) + _bn(planes) * 2
            if stride != 1 or width != out:  # the projection shortcut
                total += _conv(width, out, 1) + _bn(out)
            width = out
    return total + width * n_classes + n_classes


def _cifar_stem(model: torchvision.models.ResNet, in_channels: int) -> nn.Module:
    # 32x32 inputs would shrink to 1x1 by stage 3 behind the ImageNet stem (7x7 stride 2 and a
    # max pool); a 3x3 stride-1 stem keeps 32x32 into stage 1, as in the CIFAR ResNet papers.
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _count_resnet18(*, in_channels: int, n_classes: int, **_: Any) -> int:
    _check_positive(in_channels=in_channels, n_classes=n_classes)
    return _resnet_count(_RESNET18, False, in_channels, n_classes)


@register_model("resnet18", count=_count_resnet18, input_kind="image")
def resnet18(
    *, in_channels: int = 3, n_classes: int = 10, zero_init_residual: bool = False
) -> nn.Module:
    """ResNet-18 (torchvision, untrained) with a 3x3 stride-1 stem and no max pool, for 32x32."""
    _check_positive(in_channels=in_channels, n_classes=n_classes)
    model = _models().resnet18(
        weights=None, num_classes=n_classes, zero_init_residual=zero_init_residual
    )
    return _cifar_stem(model, in_channels)


def _count_resnet50(*, in_channels: int, n_classes: int, **_: Any) -> int:
    _check_positive(in_channels=in_channels, n_classes=n_classes)
    return _resnet_count(_RESNET50, True, in_channels, n_classes)


@register_model("resnet50", count=_count_resnet50, input_kind="image")
def resnet50(
    *, in_channels: int = 3, n_classes: int = 10, zero_init_residual: bool = False
) -> nn.Module:
    """ResNet-50 (torchvision, untrained) with a 3x3 stride-1 stem and no max pool, for 32x32."""
    _check_positive(in_channels=in_channels, n_classes=n_classes)
    model = _models().resnet50(
        weights=None, num_classes=n_classes, zero_init_residual=zero_init_residual
    )
    return _cifar_stem(model, in_channels)


# Pooling the feature map to a fixed grid makes the classifier, and the count, independent of
# the image size (28x28 Fashion-MNIST, 32x32 CIFAR and 8x8 digits all fit).
_GRID = 4


def _count_small_cnn(
    *, in_channels: int, n_classes: int, width: int, hidden_dim: int, **_: Any
) -> int:
    _check_positive(
        in_channels=in_channels, n_classes=n_classes, width=width, hidden_dim=hidden_dim
    )
    features = 2 * width * _GRID * _GRID
    return (
        _conv(in_channels, width, 3) + _bn(width)
        + _conv(width, 2 * width, 3) + _bn(2 * width)
        + features * hidden_dim + hidden_dim
        + hidden_dim * n_classes + n_classes
    )


@register_model("small_cnn", count=_count_small_cnn, input_kind="image")
def small_cnn(
    *, in_channels: int = 1, n_classes: int = 10, width: int = 32, hidden_dim: int = 128
) -> nn.Module:
    """Two conv blocks (3x3 conv, BatchNorm, ReLU, 2x2 max pool; width, 2*width) -> MLP head."""
    _check_positive(
        in_channels=in_channels, n_classes=n_classes, width=width, hidden_dim=hidden_dim
    )
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(_GRID),
        nn.Flatten(),
        nn.Linear(2 * width * _GRID * _GRID, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, n_classes),
    )
