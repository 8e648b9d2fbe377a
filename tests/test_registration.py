"""Registration with PEFT: idempotent, reload-safe, and configs round-trip through PEFT's own loaders."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import sparse_peft
from sparse_peft import SparseConfig


def test_registered_under_one_type_with_our_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SPARSE"] is sparse_peft.SparseConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SPARSE"] is sparse_peft.SparseModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SPARSE"] == "sparse_"


def test_register_is_idempotent_and_survives_reload():
    sparse_peft.register(sparse_peft.SparseConfig, sparse_peft.SparseModel)
    importlib.reload(importlib.import_module("sparse_peft"))
    import sparse_peft as reloaded

    assert PEFT_TYPE_TO_TUNER_MAPPING["SPARSE"] is reloaded.SparseModel


def test_config_round_trips_through_peft(tmp_path):
    config = SparseConfig(method="sara", target_modules=["q_proj"], density=0.02)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "SparseConfig"
    assert loaded.method == "sara" and loaded.selection == "small_magnitude" and loaded.density == 0.02
    assert loaded.target_modules == {"q_proj"}


def test_method_presets_fill_only_unset_fields():
    config = SparseConfig(method="dsee", r=4)
    assert (config.r, config.structure, config.selection) == (4, "unstructured", "lowrank_residual")
    assert SparseConfig(method="lora_ggpo").structure == "none"
    assert SparseConfig().structure == "unstructured" and SparseConfig().r == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="lora"), "unknown method"),
        (dict(density=0), "density"),
        (dict(density=1.5), "density"),
        (dict(structure="diagonal"), "structure"),
        (dict(selection="best"), "selection"),
        (dict(r=-1), "r=-1"),
        (dict(structure="none"), "r must be > 0"),
        (dict(equivalent_rank=0), "equivalent_rank"),
        (dict(num_trainable=0), "num_trainable"),
        (dict(equivalent_rank=4, r=4), "no budget for the sparse part"),
        (dict(num_trainable=5, equivalent_rank=2), "both set the per-layer budget"),
        (dict(reselection_steps=5, structure="rows"), "structure='unstructured'"),
        (dict(reselection_steps=5, accumulation_steps=6), "accumulation_steps"),
        (dict(reselection_steps=5, regrowth="magic"), "regrowth"),
        (dict(bias="some"), "bias"),
        (dict(layers_pattern="layers"), "layers_to_transform"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseConfig(**kwargs)


def test_budget_matches_lora_at_equivalent_rank():
    config = SparseConfig(equivalent_rank=4)
    assert config.budget("unstructured", 64, 32) == 4 * (64 + 32)
    assert config.budget("columns", 64, 32) == 4 * (64 + 32) // 64
    assert SparseConfig(density=0.5).budget("rows", 10, 3) == 5
    # with a low-rank part, the sparse part gets what is left of the LoRA-sized budget
    assert SparseConfig(equivalent_rank=8, r=2).budget("unstructured", 64, 32) == 6 * (64 + 32)


def test_loading_without_import_fails_with_the_known_key_error(tmp_path):
    """Without `import sparse_peft`, PEFT does not know the type: document what users see."""
    SparseConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    code = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "SPARSE" in result.stderr
    code = f"import sparse_peft; from peft import PeftConfig; print(type(PeftConfig.from_pretrained({str(tmp_path)!r})).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "SparseConfig", result.stderr


def test_an_incomplete_method_warns(monkeypatch):
    from sparse_peft.methods import METHODS

    monkeypatch.setattr(METHODS["dsee"], "missing", "the pruning")
    with pytest.warns(UserWarning, match="incomplete in this release: the pruning"):
        SparseConfig(method="dsee")
