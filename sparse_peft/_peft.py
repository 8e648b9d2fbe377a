"""The one place that touches PEFT's internals: the peft-type enum and the registry dicts.

PEFT's `register_peft_method` only accepts names that are already members of its closed
`PeftType` enum. We use our own `(str, Enum)` whose member's name equals its value: it hashes and
compares like the string "SPARSE", so the `peft_type` read back from an adapter_config.json finds
our entries in PEFT's registry, and it still has the `.value` that transformers reads. Needs
peft >= 0.21, whose state-dict hooks let an unknown type save and load.

All six methods share this one type (a `method` field tells them apart): PEFT refuses to put
adapters of different peft types in one model, and we want any mix of methods side by side.
"""

from __future__ import annotations

import enum


class SparsePeftType(str, enum.Enum):
    # name == value is required: see the module docstring
    SPARSE = "SPARSE"


PREFIX = "sparse_"


def register(config_cls, model_cls) -> None:
    """Register the sparse method with PEFT. Safe to call again (re-import, importlib.reload)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    if "SPARSE" in PeftType.__members__:
        # PEFT itself now has a method of this name: we cannot take it over silently.
        existing = PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.SPARSE)
        if existing is not None and existing.__module__.split(".")[0] != "sparse_peft":
            raise RuntimeError(
                "This PEFT version ships its own 'SPARSE' method, which clashes with sparse_peft; "
                "install a peft version that sparse_peft supports (see its pyproject.toml)"
            )
        key = PeftType.SPARSE
        if existing is None:
            register_peft_method(name="sparse", config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
            return
    else:
        key = SparsePeftType.SPARSE
    previous = PEFT_TYPE_TO_TUNER_MAPPING.get(key)
    if previous is not None and previous.__module__.split(".")[0] != "sparse_peft":
        raise RuntimeError(f"another package ({previous.__module__}) already registered the PEFT type 'SPARSE'")
    clashing = [pt for pt, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items() if prefix == PREFIX and pt != key]
    if clashing:
        raise RuntimeError(f"the parameter prefix {PREFIX!r} is already used by PEFT type {clashing[0]}")
    # Plain assignment rather than a "registered already" check: after importlib.reload the classes
    # are new objects, and the registry must point at the live ones.
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[key] = model_cls


def install_model_card_hook() -> None:
    """Have `PeftModel.save_pretrained` (hence `push_to_hub`'s save too) add our section to the model card.

    PEFT writes the card in `PeftModel.create_or_update_model_card`; we wrap it, once, and only act
    for models that hold a sparse adapter.
    """
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_sparse_peft", False):
        return

    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        if any(getattr(c, "peft_type", None) == "SPARSE" for c in self.peft_config.values()):
            from .hub import update_model_card

            update_model_card(output_dir, self)

    create_or_update_model_card._sparse_peft = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
