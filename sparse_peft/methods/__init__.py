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
    # default targets by role in the architecture map (see architectures.py), when the user names none
    target_roles: tuple = ()
    # What of the method is not built yet. Non-empty means `SparseConfig` warns when it is chosen.
    missing: str = ""


METHODS: dict[str, Method] = {
    m.METHOD["name"]: Method(**m.METHOD) for m in (spiel, s2ft, dsee, sara, lora_ggpo, sltrain)
}
