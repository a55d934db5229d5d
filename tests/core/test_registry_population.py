"""The registry's population capability: which trainer can stack a family's members."""

from __future__ import annotations

import pytest
from torch import nn

import core
from core import _registry, train_population


@pytest.fixture(scope="module")
def data() -> core.Dataset:
    return core.load_dataset("digits")


def test_families_declare_their_population_trainer_in_the_registry() -> None:
    assert core.list_models(population="mlp") == sorted(core.POPULATION_FAMILIES)
    assert set(core.POPULATION_FAMILIES) == {
        "dendritic_simple", "dendritic_with_hidden", "soma_disabled", "vanilla_mlp"}
    assert set(core.RECURRENT_POPULATION_FAMILIES) == {"diru", "lstm", "gru"}
    assert core.list_models(population="recurrent") == sorted(core.RECURRENT_POPULATION_FAMILIES)
    for name in core.list_models():
        fam = core.get_family(name)
        assert fam.population == ("mlp" if name in core.POPULATION_FAMILIES else
                                  "recurrent" if name in core.RECURRENT_POPULATION_FAMILIES else None)
    with pytest.raises(ValueError, match="'mlp', 'recurrent'"):
        core.list_models(population="conv")
    with pytest.raises(ValueError, match="population must be one of"):
        core.register_model("never_registered", population="tree")


def test_a_family_registered_as_mlp_is_accepted_by_train_population(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(_registry._MODELS, "tiny_mlp", core.ModelFamily(
        name="tiny_mlp", build=_registry._MODELS["vanilla_mlp"].build, count=None,
        defaults=dict(_registry._MODELS["vanilla_mlp"].defaults), population="mlp"))
    assert "tiny_mlp" in core.list_models(population="mlp")
    results = train_population("tiny_mlp", [dict(hidden_dim=4, n_hidden_layers=1)], data, 1,
                               device="cpu")
    assert results[0].status == "completed"
    monkeypatch.setitem(_registry._MODELS, "tiny_mlp", core.ModelFamily(
        name="tiny_mlp", build=_registry._MODELS["vanilla_mlp"].build, count=None,
        defaults=dict(_registry._MODELS["vanilla_mlp"].defaults)))
    with pytest.raises(ValueError, match="cannot be trained as a population"):
        train_population("tiny_mlp", [{}], data, 1, device="cpu")


def test_register_model_records_the_population_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))  # leave the real one alone

    @core.register_model("population_probe", population="recurrent")
    def probe(*, hidden: int = 2) -> nn.Module:
        return nn.Linear(hidden, 1)

    assert core.get_family("population_probe").population == "recurrent"
    assert "population_probe" in core.list_models(population="recurrent")
    assert "population_probe" not in core.list_models(population="mlp")
    assert "population_probe" in core.list_models()
