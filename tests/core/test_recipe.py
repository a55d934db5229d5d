"""train_model's recipe keys: learning-rate schedules, label smoothing and shift augmentation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from core import Dataset, create_model, load_dataset, train_model
from core._train import MAX_SHIFT, lr_multiplier, schedule_steps, shift_images


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def _model(**kw: object) -> nn.Module:
    args = {"in_dim": 64, "n_neurons": 10, "n_dendrites": 4, "n_dendrite_inputs": 16, "seed": 0}
    args.update(kw)
    return create_model("dendritic_simple", **args)  # type: ignore[arg-type]


# -- learning-rate schedules -------------------------------------------------------------------
def test_schedules_have_their_shapes() -> None:
    assert [lr_multiplier("constant", t, 100, 0) for t in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [lr_multiplier("constant", t, 100, 4) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [lr_multiplier("cosine", t, 100, 0) for t in range(100)]
    assert cos[0] == 1.0 and math.isclose(cos[50], 0.5) and 0 < cos[-1] < 0.01
    assert all(a > b for a, b in zip(cos, cos[1:], strict=False))
    one = [lr_multiplier("onecycle", t, 100, 30) for t in range(100)]
    assert math.isclose(one[0], 1 / 25 + (24 / 25) / 30) and one[29] == 1.0
    assert max(one) == 1.0 and one[-1] < 0.01 and min(one) > 0


def test_warm_up_is_counted_in_steps_and_onecycle_warms_up_by_default() -> None:
    assert schedule_steps(1000, 100, 10, "constant", None) == (100, 0)
    assert schedule_steps(1001, 100, 10, "cosine", 0.5) == (110, 6)  # 11 steps an epoch
    assert schedule_steps(1000, 100, 10, "onecycle", None) == (100, 30)
    assert schedule_steps(1000, 100, 10, "onecycle", 0) == (100, 0)


def test_train_model_sets_each_steps_learning_rate(digits: Dataset) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    seen: list[float] = []

    class Record:
        def after_backward(self, model: nn.Module) -> None: ...

        def after_step(self, model: nn.Module) -> None:
            seen.append(opt.param_groups[0]["lr"])

    train_model(model, digits, n_epochs=2, batch_size=256, optimizer=opt, step_hooks=[Record()],
                lr_schedule="cosine", warmup_epochs=0.5)
    steps = math.ceil(len(digits.x_train) / 256)
    assert len(seen) == 2 * steps
    warm = round(0.5 * steps)
    expected = [0.01 * lr_multiplier("cosine", t, 2 * steps, warm) for t in range(2 * steps)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[warm - 1] == pytest.approx(0.01) and seen[-1] < 0.002
    assert opt.param_groups[0]["lr"] == 0.01  # the caller's optimizer comes back as it was


def test_schedules_change_training_and_defaults_do_not(digits: Dataset) -> None:
    base = train_model(_model(), digits, n_epochs=2, lr=1e-2, seed=1)
    same = train_model(_model(), digits, n_epochs=2, lr=1e-2, seed=1, lr_schedule="constant",
                       warmup_epochs=0, label_smoothing=0.0, augment="none")
    for h_same, h_base in zip(same.history, base.history, strict=True):  # bit for bit
        assert {k: v for k, v in h_same.items() if k != "seconds"} == {
            k: v for k, v in h_base.items() if k != "seconds"
        }
    for schedule in ("cosine", "onecycle"):
        other = train_model(_model(), digits, n_epochs=2, lr=1e-2, seed=1, lr_schedule=schedule)
        assert other.val_loss != base.val_loss
        assert other.history[-1]["train_loss"] < other.history[0]["train_loss"]


# -- label smoothing ---------------------------------------------------------------------------
def test_label_smoothing_applies_to_the_training_loss_only(digits: Dataset) -> None:
    model = _model(synaptic_resampling=False)
    with torch.no_grad():
        out = model(digits.x_train)
        smooth = float(F.cross_entropy(out, digits.y_train, label_smoothing=0.2))
        plain = float(F.cross_entropy(model(digits.x_val), digits.y_val))
    # with a vanishing learning rate the model does not move, so the losses are its own
    r = train_model(model, digits, n_epochs=1, lr=1e-12, label_smoothing=0.2)
    assert r.train_loss == pytest.approx(smooth, rel=1e-4)
    assert r.val_loss == pytest.approx(plain, rel=1e-4)


# -- shift augmentation -------------------------------------------------------------------------
def test_shift_images_moves_whole_pixels_and_repeats_edges() -> None:
    x = torch.arange(2 * 2 * 5 * 6, dtype=torch.float32).view(2, 2, 5, 6)
    centre = torch.full((2, 2), MAX_SHIFT)
    assert torch.equal(shift_images(x, centre), x)
    # image 0: content from one row down and two columns left; image 1: two rows up
    shifts = torch.tensor([[MAX_SHIFT + 1, MAX_SHIFT - 2], [MAX_SHIFT - 2, MAX_SHIFT]])
    y = shift_images(x, shifts)
    assert torch.equal(y[0, :, :4, 2:], x[0, :, 1:, :4])
    assert torch.equal(y[0, :, :, 0], y[0, :, :, 2])  # the left edge repeated
    assert torch.equal(y[1, :, 2:], x[1, :, :3])
    assert torch.equal(y[1, :, 0], x[1, :, 0]) and torch.equal(y[1, :, 1], x[1, :, 0])


def test_shift_augmentation_trains_flat_and_image_inputs(digits: Dataset) -> None:
    base = train_model(_model(), digits, n_epochs=1, seed=1)
    a = train_model(_model(), digits, n_epochs=1, seed=1, augment="shift")
    b = train_model(_model(), digits, n_epochs=1, seed=1, augment="shift")
    assert a.val_loss == b.val_loss != base.val_loss  # seeded, and it does change the inputs
    a = train_model(_model(), digits, n_epochs=3, lr=3e-2, batch_size=64, seed=1, augment="shift")
    # two pixels is a quarter of a digit's width: a hard augmentation, yet it still learns
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"] - 0.2
    assert a.test_accuracy is not None and a.test_accuracy > 0.25  # chance is 0.1
    images = load_dataset("digits", flatten=False)
    conv = create_model("dendritic_conv", seed=0, n_units1=4, n_units2=4,
                        n_dendrite_inputs2=8, pool_grid=1)
    r = train_model(conv, images, n_epochs=1, lr=1e-2, augment="shift")
    assert r.status == "completed"


def test_shift_augmentation_needs_images(digits: Dataset) -> None:
    flat = replace(digits, input_shape=(64,))
    with pytest.raises(ValueError, match="augment='shift' needs image inputs"):
        train_model(_model(), flat, n_epochs=1, augment="shift")


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr_schedule": "step"}, "lr_schedule must be one of 'constant', 'cosine', 'onecycle'"),
        ({"warmup_epochs": -1.0}, "warmup_epochs"),
        ({"warmup_epochs": 3.0}, "warmup_epochs"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"augment": "flip"}, "augment must be one of 'none', 'shift'"),
    ],
)
def test_bad_recipe_arguments_name_the_argument_and_the_allowed(
    digits: Dataset, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        train_model(_model(), digits, n_epochs=2, **kwargs)  # type: ignore[arg-type]


def test_label_smoothing_is_refused_for_regression(digits: Dataset) -> None:
    reg = replace(digits, task="regression", y_train=digits.y_train.float())
    with pytest.raises(ValueError, match="classification only"):
        train_model(_model(), reg, n_epochs=1, label_smoothing=0.1)
