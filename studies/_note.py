"""The study's spec as an optuna-dashboard note, so the dashboard shows what a study searches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from ._space import ParamDef
    from ._spec import StudySpec

__all__ = ["spec_note", "write_spec_note"]


def _code(value: Any) -> str:
    # Markdown table cells: a '|' inside a value would end the cell.
    text = str(value).replace("|", "¦").replace("`", "'")
    return f"`{text}`"


def _range_text(p: ParamDef) -> str:
    if p.kind == "categorical":
        return "one of " + ", ".join(_code(c) for c in p.choices)
    low, high = (int(p.low), int(p.high)) if p.kind == "int" else (p.low, p.high)
    extra = [f"step {p.step:g}"] if p.step is not None else []
    extra += ["log scale"] if p.log else []
    return f"{p.kind} {low:g} to {high:g}" + (f" ({', '.join(extra)})" if extra else "")


def spec_note(spec: StudySpec, study_name: str | None = None) -> str:
    """The spec summary in Markdown: what is searched, on what, under which budget."""
    name = study_name or spec.name or "(unnamed)"
    budget = f"{spec.max_params:,} parameters" if spec.max_params is not None else "none"
    objectives = ", ".join(f"{d} {o}" for o, d in zip(spec.objectives, spec.directions, strict=True))
    rows = [
        ("family", _code(spec.model)),
        ("dataset", _code(spec.dataset)),
        ("budget (max_params)", budget),
        ("objective" + ("s (Pareto front)" if len(spec.objectives) > 1 else ""), objectives),
        ("sampler", _code(spec.sampler)),
        ("pruner", _code(spec.pruner)),
        ("n_trials", str(spec.n_trials)),
        ("n_epochs", str(spec.n_epochs)),
    ]
    space = spec.space
    # The recipe's fixed values; a searched one is in the search space below instead.
    recipe = {"batch_size": spec.batch_size, "lr": f"{spec.lr:g}", "optimizer": spec.optimizer,
              "weight_decay": f"{spec.weight_decay:g}"}
    rows += [(k, _code(v)) for k, v in recipe.items() if k not in space]
    if spec.subset_size is not None:
        rows.append(("subset_size", str(spec.subset_size)))
    lines = [f"## dendro study {_code(name)}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "### Search space", ""]
    if space:
        lines += ["| parameter | values |", "|---|---|"]
        lines += [f"| {_code(n)} | {_range_text(p)} |" for n, p in space.items()]
    else:
        lines.append("nothing searched: the family's defaults and `model_params`")
    for title, fixed in (("Fixed model_params", spec.model_params), ("bio", spec.bio), ("growth", spec.growth)):
        if fixed:
            lines += ["", f"### {title}", ""]
            lines += [f"- {_code(k)}: {_code(v)}" for k, v in fixed.items()]
    lines += ["", "Points over the budget are never trained: Optuna shows them as pruned, with "
              "the user attribute `infeasible`. The page at `/` plots accuracy against size."]
    return "\n".join(lines) + "\n"


def write_spec_note(study: optuna.Study, spec: StudySpec) -> None:
    """Save :func:`spec_note` as the study's note in optuna-dashboard (a new note version)."""
    # Imported here: optuna_dashboard brings its web framework, which workers never need.
    from optuna_dashboard import save_note

    save_note(study, spec_note(spec, study.study_name))
