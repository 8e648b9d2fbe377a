"""Config a user gives that cannot be honoured is refused with the field, the value and the fix, and
the model is left as it was (docs/troubleshooting.md lists every refusal)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from peft import PeftModel, get_peft_model

import sparse_peft  # noqa: F401  (registers the method)
from sparse_peft import SparseConfig, SparseLayer

from .conftest import MLP, Conv2dModel, tiny_llama


def _no_sparse_layers(model: nn.Module) -> bool:
    return not any(isinstance(m, SparseLayer) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(density=0.1, equivalent_rank=4), "density=0.1 and equivalent_rank=4 both set the per-layer budget"),
        (dict(density=0.1, num_trainable=100), "density=0.1 and num_trainable=100 both set"),
        (dict(regrowth="bogus"), "regrowth='bogus'"),
        (dict(initial_reselection_rate=5), "initial_reselection_rate=5"),
        (dict(method="spiel", reselection_steps=0, regrowth="momentum"),
         "regrowth='momentum' has no effect with reselection_steps=0"),
        (dict(method="spiel", reselection_steps=0, accumulation_steps=3), "accumulation_steps=3 has no effect"),
        (dict(lora_alpha=16), r"lora_alpha=16 has no effect without a low-rank part \(r=0\)"),
        (dict(scale_sparse=True), r"scale_sparse=True has no effect without a low-rank part"),
        (dict(method="lora_ggpo", perturbation="none", perturbation_sigma=0.1),
         "perturbation_sigma=0.1 has no effect with perturbation='none'"),
        (dict(method="sara", nuclear_norm_weight=0, nuclear_norm_layers=2),
         "nuclear_norm_layers=2 has no effect with nuclear_norm_weight=0"),
        # a method's knob belongs to it: refused beside another method, and knobs of two methods at once
        (dict(method="sara", reselection_steps=5), "reselection_steps=5 is a knob of method spiel, not of method='sara'"),
        (dict(reselection_steps=5, nuclear_norm_weight=0.1), "do not belong to one method"),
        (dict(method="s2ft", method_config={"reselection_steps": 5}), "method='s2ft' has no knob 'reselection_steps'"),
        (dict(method="spiel", reselection_steps="5"), r"spiel knob reselection_steps = '5' \(str\) must be an integer"),
        (dict(residual_rank=4), "residual_rank=4 has no effect with selection='random'"),
        (dict(density="0.1"), r"SparseConfig.density = '0.1' \(str\) must be a number or None"),
        (dict(seed="x"), r"SparseConfig.seed = 'x' \(str\) must be an integer"),
        (dict(target_modules=5), r"SparseConfig.target_modules = 5 \(int\) must be a (list of a )?string"),
        (dict(r=2.5), r"SparseConfig.r = 2.5 \(float\) must be an integer or None"),
        (dict(init_weights="no"), r"SparseConfig.init_weights = 'no' \(str\) must be true/false"),
        (dict(module_density={"q_proj": "high"}), r"SparseConfig.module_density"),
    ],
)
def test_config_that_cannot_be_honoured_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseConfig(**kwargs)


def test_a_knob_set_after_construction_reaches_the_method():
    config = SparseConfig(method="spiel")
    config.reselection_steps = 7  # as a field would be set: into the knobs, saved with them
    assert config.knobs.reselection_steps == 7 and config.method_config["reselection_steps"] == 7
    assert "reselection_steps" not in config.__dict__


def test_a_method_preset_still_takes_the_users_budget():
    # the preset's density is not the user's: equivalent_rank replaces it without a conflict
    config = SparseConfig(method="spiel", equivalent_rank=8)
    assert config.equivalent_rank == 8
    assert SparseConfig(method="dsee", lora_alpha=8).lora_alpha == 8  # DSEE has r > 0


def test_saved_configs_with_every_field_filled_load_again(tmp_path):
    # a saved config holds the preset's density beside equivalent_rank / num_trainable: not a conflict
    for extra in (dict(equivalent_rank=2), dict(num_trainable=300)):
        model = get_peft_model(MLP(), SparseConfig(method="spiel", target_modules=["lin0", "lin1"], **extra))
        model.save_pretrained(tmp_path / "a")
        again = PeftModel.from_pretrained(MLP(), tmp_path / "a")
        assert again.peft_config["default"].density == pytest.approx(model.peft_config["default"].density)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("target_modules", 5, "SparseConfig.target_modules = 5"),
        ("seed", "x", "SparseConfig.seed = 'x'"),
        ("density", "0.1", "SparseConfig.density = '0.1'"),
        ("reselection_steps", 2.5, "spiel knob reselection_steps = 2.5"),
    ],
)
def test_a_hand_edited_adapter_config_is_refused_by_field(tmp_path, field, value, message):
    model = get_peft_model(MLP(), SparseConfig(target_modules=["lin0", "lin1"], density=0.2))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    base = MLP()
    with pytest.raises(ValueError, match=message + ".*adapter_config.json"):
        PeftModel.from_pretrained(base, tmp_path)
    assert _no_sparse_layers(base)


def test_a_module_density_key_that_matches_nothing_is_refused_and_the_model_is_untouched():
    base = MLP()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = SparseConfig(target_modules=["lin0", "lin1"], module_density={"lin9": 0.5})
    with pytest.raises(ValueError, match=r"module_density key 'lin9' matches no adapted module.*'lin0', 'lin1'"):
        get_peft_model(base, config)
    assert _no_sparse_layers(base)
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    # a suffix that does match is fine
    get_peft_model(MLP(), SparseConfig(target_modules=["lin0", "lin1"], module_density={"lin1": 0.5}))


def test_disjoint_from_an_adapter_that_does_not_exist_is_refused():
    model = get_peft_model(MLP(), SparseConfig(target_modules=["lin0", "lin1"], density=0.3))
    with pytest.raises(ValueError, match=r"disjoint_from=\['defualt'\] names \['defualt'\].*it has \['default'\]"):
        model.add_adapter("task", SparseConfig(target_modules=["lin0", "lin1"], density=0.3, disjoint_from="defualt"))
    assert set(model.peft_config) == {"default"}
    assert all("task" not in m._all_available_adapter_names() for m in model.modules() if isinstance(m, SparseLayer))
    # the right name: the supports do not overlap
    model.add_adapter("task", SparseConfig(target_modules=["lin0", "lin1"], density=0.3, disjoint_from="default"))
    layer = model.base_model.model.lin0
    assert not set(layer.sparse_indices["default"].tolist()) & set(layer.sparse_indices["task"].tolist())


def test_num_trainable_beyond_the_targets_is_refused_not_clamped():
    base = MLP()
    total = 10 * 20 + 20 * 16
    with pytest.raises(ValueError, match=f"num_trainable=1,000 is more than the {total} weights"):
        get_peft_model(base, SparseConfig(target_modules=["lin0", "lin1"], num_trainable=1000))
    assert _no_sparse_layers(base)
    model = get_peft_model(MLP(), SparseConfig(target_modules=["lin0", "lin1"], num_trainable=total))
    assert model.get_nb_trainable_parameters()[0] == total


def test_a_budget_whole_heads_cannot_meet_is_reported():
    # one whole head (8 columns × 32 rows) per attention output at least: far above a tiny total
    with pytest.warns(UserWarning, match=r"num_trainable=100 was asked, but [\d,]+ sparse parameters train"):
        get_peft_model(tiny_llama(), SparseConfig(method="s2ft", num_trainable=100))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a total that whole units meet says nothing
        get_peft_model(MLP(), SparseConfig(target_modules=["lin0", "lin1"], num_trainable=260))


def test_conv2d_columns_are_refused_and_rows_are_exact():
    base = Conv2dModel()
    with pytest.raises(ValueError, match="conv2d: structure='columns' is not supported on Conv2d layers"):
        get_peft_model(base, SparseConfig(target_modules=["conv2d"], structure="columns", density=0.3))
    assert _no_sparse_layers(base)
    # rows are whole output channels: the output equals a dense conv with W + ΔW (float64 reference)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).double()
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).double()
    reference.load_state_dict(base.state_dict())
    model = get_peft_model(base, SparseConfig(target_modules=["0"], structure="rows", density=0.3, init_weights=False))
    delta = model.base_model.model[0].get_delta_weight("default")
    assert delta.abs().sum(dim=(1, 2, 3)).count_nonzero() == round(0.3 * 8)
    with torch.no_grad():
        reference[0].weight += delta
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x))


def test_training_under_deepspeed_with_no_scheduler_bound_fails_at_the_first_forward_naming_the_fix():
    # DeepSpeed's engine steps no torch optimizer over the adapter's tensors: the schedule would never run.
    # `_hp_mapping` is what ZeRO (stages 1-2) leaves on the parameters its optimizer holds; no DeepSpeed needed
    model = get_peft_model(tiny_llama().train(), SparseConfig(method="lora_ggpo", target_modules="all-linear"))
    for name, param in model.named_parameters():
        if param.requires_grad:
            param._hp_mapping = None
    ids = torch.randint(0, 128, (1, 6))
    with pytest.raises(RuntimeError, match=r"trains under DeepSpeed.*SparseScheduler\(model, engine, total_steps=N\)"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():
        model.eval()(input_ids=ids)  # inference is not training: no schedule needed


def test_saving_from_a_state_dict_without_the_adapters_tensors_is_refused(tmp_path):
    # what the Trainer hands save_pretrained under ZeRO-3 without stage3_gather_16bit_weights_on_model_save
    model = get_peft_model(tiny_llama(), SparseConfig(method="dsee", target_modules="all-linear"))
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save: true"):
        model.save_pretrained(tmp_path, state_dict={})
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_fp16_under_deepspeed_is_refused_before_the_adapters_scheduler_changes():
    # DeepSpeed's ZeRO optimizer is known by where its class lives; its fp16 loss scaling skips steps on overflow
    # after the per-step work has seen the gradients. A stand-in optimizer is enough: no DeepSpeed needed
    from sparse_peft import SparseScheduler
    from sparse_peft.schedule import _SCHEDULES

    class ZeroStandIn:
        __module__ = "deepspeed.runtime.zero.stage3"
        optimizer = None

        def step(self):
            pass

    model = get_peft_model(tiny_llama().train(), SparseConfig(method="lora_ggpo", target_modules="all-linear")).half()
    before = dict(_SCHEDULES[model.base_model])
    with pytest.raises(ValueError, match=r"fp16 loss scaling.*train in bf16"):
        SparseScheduler(model, ZeroStandIn(), total_steps=4)
    assert _SCHEDULES[model.base_model] == before and not before["default"]._retired
