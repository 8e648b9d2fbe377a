"""The six methods, each a preset over the general fields of `SparseConfig`.

A method file defines one `Method`: its paper, and the values it gives to the general fields
(structure, selection rule, density, rank, ...) when the user leaves them unset. A method file
holds no autograd, no I/O and no PEFT plumbing; if a method needs more than a preset, the core is
missing a general piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import dsee, lora_ggpo, s2ft, sara, sltrain, spiel


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    paper: str
    defaults: dict = field(default_factory=dict)
    # The layers it adapts when the user names no target_modules (architectures.default_targets):
    # "all-linear" (every nn.Linear / Conv1D but the output head, PEFT's rule), "all-layers" (those and
    # nn.Conv2d), "query_value" (the attention query and value projections, LoRA's classic choice),
    # "roles" (the roles below, from the architecture map). Each method file says why, from its paper.
    default_targets: str = "all-linear"
    # default targets by role in the architecture map (see architectures.py), for default_targets="roles"
    target_roles: tuple = ()
    # What of the method is not built yet. Non-empty means `SparseConfig` warns when it is chosen.
    missing: str = ""


METHODS: dict[str, Method] = {
    m.METHOD["name"]: Method(**m.METHOD) for m in (spiel, s2ft, dsee, sara, lora_ggpo, sltrain)
}


def lora_budget(name: str, rank: int) -> dict:
    """The `SparseConfig` fields that give method `name` the trainable count of a LoRA of rank `rank`
    on the same layers: `r` for a low-rank-only preset, half the rank to each part for a preset
    with a low-rank part of its own (`r=rank // 2` next to `equivalent_rank=rank`), else
    `equivalent_rank`. Comparisons with LoRA (the quickstart, the benchmarks) start here."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    preset = METHODS[name].defaults
    if preset.get("structure") == "none":
        return dict(r=rank)
    if preset.get("r"):
        if rank < 2:
            raise ValueError(f"rank={rank} is too small to share between {name}'s sparse and low-rank parts; use rank >= 2")
        return dict(r=rank // 2, equivalent_rank=rank)
    return dict(equivalent_rank=rank)
