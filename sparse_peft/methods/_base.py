"""The interface every method implements (see methods/__init__.py), and what its per-step work sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Run:
    """What a method's per-step work sees of a training run: the adapter, its config, its layers, the
    run's length (None when not known), and the optimizer (None until the first step binds it)."""

    adapter: str
    config: Any
    layers: dict = field(default_factory=dict)  # name -> sparse layer holding the adapter
    total: Optional[int] = None
    optimizer: Any = None


class Method:
    """One sparse fine-tuning method. Subclass it in `methods/<name>.py`; every hook has a default."""

    name: str = ""  # set from the file's name when discovered (methods/<name>.py)
    title: str = ""
    paper: str = ""
    # values for the general SparseConfig fields the user leaves unset
    defaults: dict = {}
    # its own fields (a dataclass; every field with metadata={"help": ...}), or None
    Knobs: Optional[type] = None
    # the layers it adapts when the user names none (architectures.default_targets): "all-linear",
    # "all-layers" (with Conv2d), "query_value", or "roles" with `target_roles` from the architecture map
    default_targets: str = "all-linear"
    target_roles: tuple = ()
    # what of the method is not built yet: non-empty makes SparseConfig warn when it is chosen
    missing: str = ""

    def check(self, config) -> None:
        """Refuse (ValueError, naming the field and the fix) knob values that clash with the general fields."""

    def has_steps(self, config) -> bool:
        """Whether this adapter has work between optimizer steps (then it gets a scheduler when created)."""
        return False

    def run_length_needed(self, config) -> str:
        """Why the per-step work needs the run's total number of optimizer steps; "" when it does not."""
        return ""

    def steps(self, run: Run) -> list:
        """The per-step work of a run: objects with any of `before_optimizer_step(t) -> dict` (gradients
        complete and clipped), `after_optimizer_step(t) -> dict` (after the update), `state_dict()` /
        `load_state_dict(state, t)` (checkpoints) and `retire()` (another scheduler took over)."""
        return []

    def choose_support(self, layer, config, module_key: str, k: int, exclude):
        """A support of its own for one layer ((positions, count) of an unstructured part), or None for
        the general rule of `config.selection`."""
        return None

    def budget(self, config, structure: str, out_features: int, in_features: int) -> Optional[int]:
        """Units per layer of its own (e.g. a column count), or None for the general budget."""
        return None

    def card_lines(self, config) -> list[str]:
        """Its extra lines in the model card."""
        return []
