"""PEFT's generic tuner checks, run for SparseConfig on MLP, Conv1D, Conv2d, tiny Llama and GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import sparse_peft
from sparse_peft import SparseConfig, SparseLayer

from .conftest import run


# a spread of supports: each structure, with and without a low-rank part
CONFIGS = {
    "unstructured": dict(structure="unstructured", density=0.2),
    "rows": dict(structure="rows", density=0.3),
    "columns": dict(structure="columns", density=0.3),
    "lowrank": dict(structure="none", r=2),
    "sparse+lowrank": dict(structure="unstructured", density=0.1, r=2, lora_alpha=4),
}


def make(case, config_name, init_weights=False, **extra):
    name, factory, x, targets = case
    kwargs = dict(CONFIGS[config_name], target_modules=targets, init_weights=init_weights, **extra)
    if name == "conv2d" and kwargs.get("structure") in ("rows", "columns"):
        pytest.skip("rows/columns are for linear layers")
    base = factory()
    return base, SparseConfig(**kwargs), x


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request):
    return request.param


def test_zero_init_is_identity(case, config_name):
    base, config, x = make(case, config_name, init_weights=True)
    expected = run(base, x)
    model = get_peft_model(copy.deepcopy(base), config)
    assert torch.allclose(run(model, x), expected, atol=1e-6)


def test_save_load_roundtrip_uses_stored_indices(case, config_name, tmp_path):
    base, config, x = make(case, config_name)
    model = get_peft_model(copy.deepcopy(base), config).eval()  # loaded adapters are in eval mode: the same path
    out = run(model, x)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "adapter_model.bin").exists()
    # a different seed in the config must not matter: indices come from the file
    torch.manual_seed(123)
    reseeded = SparseConfig.from_pretrained(tmp_path)
    reseeded.seed = 99
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=reseeded)
    assert torch.allclose(run(loaded, x), out, atol=1e-6)
    assert torch.allclose(run(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x), out, atol=1e-6)


def test_merge_unmerge_and_merge_and_unload(case, config_name):
    base, config, x = make(case, config_name)
    base_out = run(base, x)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    out = run(model, x)
    assert not torch.allclose(out, base_out, atol=1e-5)
    model.merge_adapter()
    assert torch.allclose(run(model, x), out, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(run(model, x), out, atol=1e-5)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(run(merged, x), out, atol=1e-5)
    # merging gives plain torch / transformers layers that any runtime can load
    assert {type(m).__module__.split(".")[0] for m in merged.modules()} <= {"torch", "transformers", "tests"}


def test_unload_restores_base(case):
    base, config, x = make(case, "sparse+lowrank")
    model = get_peft_model(copy.deepcopy(base), config)
    restored = model.unload()
    assert torch.allclose(run(restored, x), run(base, x))
    assert restored.state_dict().keys() == base.state_dict().keys()


def test_disable_adapter(case, config_name):
    base, config, x = make(case, config_name)
    model = get_peft_model(copy.deepcopy(base), config)
    out = run(model, x)
    with model.disable_adapter():
        assert torch.allclose(run(model, x), run(base, x), atol=1e-6)
    assert torch.allclose(run(model, x), out)


def test_only_adapter_parameters_train(case, config_name):
    base, config, x = make(case, config_name)
    model = get_peft_model(copy.deepcopy(base), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        run(model, x).float().pow(2).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == ("sparse_" in n), n
        assert (p.grad is not None) == ("sparse_" in n), n


def test_print_trainable_parameters_counts_what_trains(case, config_name):
    base, config, x = make(case, config_name)
    model = get_peft_model(copy.deepcopy(base), config)
    trainable, total = model.get_nb_trainable_parameters()
    expected = sum(
        layer.get_delta("default").num_trainable() for layer in model.modules() if isinstance(layer, SparseLayer)
    )
    assert trainable == expected > 0
    assert total == sum(p.numel() for p in base.parameters()) + trainable


def test_multiple_adapters_switch_and_delete(case):
    base, config, x = make(case, "unstructured")
    model = get_peft_model(copy.deepcopy(base), config)
    out_default = run(model, x)
    model.add_adapter("other", SparseConfig(**{**CONFIGS["sparse+lowrank"], "target_modules": case[3], "init_weights": False, "seed": 7}))
    model.set_adapter("other")
    out_other = run(model, x)
    assert not torch.allclose(out_default, out_other)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".other") for n in trainable)
    model.set_adapter("default")
    assert torch.allclose(run(model, x), out_default)
    # two active adapters at once add their updates, on each adapted layer
    layer = next(m for m in model.modules() if isinstance(m, SparseLayer))
    inputs = []
    handle = layer.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    run(model, x)
    handle.remove()
    h = inputs[0]
    outs = {}
    for active in (["default"], ["other"], ["default", "other"]):
        model.base_model.set_adapter(active)
        outs[tuple(active)] = layer(h)
    base_h = layer.get_base_layer()(h)
    summed = base_h + (outs[("default",)] - base_h) + (outs[("other",)] - base_h)
    assert torch.allclose(outs[("default", "other")], summed, atol=1e-5)
    model.set_adapter("default")
    model.delete_adapter("other")
    for module in model.modules():
        for attr in SparseLayer.adapter_layer_names + SparseLayer.other_param_names:
            if hasattr(module, attr):
                assert "other" not in getattr(module, attr)
    assert "other" not in model.peft_config
    assert torch.allclose(run(model, x), out_default)


def test_merge_two_adapters_then_unmerge_restores_base(case):
    base, config, x = make(case, "unstructured")
    model = get_peft_model(copy.deepcopy(base), config)
    model.add_adapter("other", SparseConfig(**{**CONFIGS["lowrank"], "target_modules": case[3], "init_weights": False}))
    model.base_model.set_adapter(["default", "other"])
    both = run(model, x)
    model.merge_adapter(["default", "other"])
    assert torch.allclose(run(model, x), both, atol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.allclose(run(model, x), run(base, x), atol=1e-5)


def test_safe_merge_refuses_nan():
    from .conftest import MLP

    model = get_peft_model(MLP(), SparseConfig(target_modules=["lin0"], init_weights=False, density=0.5))
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.sparse_values["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_adapter(safe_merge=True)
    assert torch.isfinite(layer.base_layer.weight).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base(dtype):
    from .conftest import tiny_llama

    base = tiny_llama().to(dtype)
    x = torch.randint(0, 128, (2, 9))
    model = get_peft_model(copy.deepcopy(base), SparseConfig(target_modules="all-linear", init_weights=False, density=0.1, r=2))
    # PEFT's default autocast_adapter_dtype keeps adapter tensors in fp32 on a half-precision base
    assert {p.dtype for n, p in model.named_parameters() if "sparse_" in n} == {torch.float32}
    out = model(x).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    model.merge_adapter()
    assert torch.allclose(model(x).logits.float(), out.float(), atol=5e-2)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert merged(x).logits.dtype == dtype


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    from .conftest import tiny_llama

    x = torch.randint(0, 128, (2, 9))
    grads = []
    for checkpointing in (False, True):
        base = tiny_llama().train()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model = get_peft_model(base, SparseConfig(target_modules="all-linear", init_weights=False, density=0.1))
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_modules_to_save_and_layers_to_transform(tmp_path):
    from .conftest import MLP

    base = MLP()
    x = torch.randn(4, 10)
    model = get_peft_model(copy.deepcopy(base), SparseConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], init_weights=False))
    assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())
    run(model, x).sum().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    out = run(model, x)
    model.save_pretrained(tmp_path)
    assert torch.allclose(run(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x), out)

    from .conftest import tiny_llama

    llama = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    adapted = [n for n, m in llama.named_modules() if isinstance(m, SparseLayer)]
    assert adapted and all(".layers.1." in n for n in adapted)


def test_unknown_target_module_and_unsupported_layer_are_refused():
    from .conftest import MLP, tiny_llama

    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(MLP(), SparseConfig(target_modules=["does_not_exist"]))
    with pytest.raises(ValueError, match="Embedding, which sparse_peft cannot adapt"):
        get_peft_model(tiny_llama(), SparseConfig(target_modules=["embed_tokens"]))


def test_default_targets_follow_the_architecture():
    from .conftest import tiny_llama

    model = get_peft_model(tiny_llama(), SparseConfig())
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, SparseLayer)}
    assert adapted == {"q_proj", "v_proj"}


def test_all_linear_skips_the_output_head():
    from .conftest import tiny_gpt2

    model = get_peft_model(tiny_gpt2(), SparseConfig(target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, SparseLayer)}
    assert adapted == {"c_attn", "c_proj", "c_fc"}


def test_trainable_token_indices_train_save_and_merge(tmp_path):
    """TRL sets trainable_token_indices when a chat template adds tokens; merging must still work."""
    from .conftest import tiny_llama

    x = torch.randint(0, 128, (2, 9))
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), SparseConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2], init_weights=False))
    model(x).logits.sum().backward()
    assert any("trainable_tokens" in n and p.grad is not None for n, p in model.named_parameters())
    out = model(x).logits
    model.save_pretrained(tmp_path)
    assert torch.allclose(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(x).logits, out, atol=1e-6)
    merged = model.merge_and_unload()
    assert torch.allclose(merged(x).logits, out, atol=1e-5)


def test_fused_layer_path_equals_the_general_path(monkeypatch):
    """Above 2% density, or where no CSR kernel and sampled gradient apply (bf16 on CPU), a frozen nn.Linear
    with an unstructured delta trains as one GEMM per block against W + Δ; a forward hook on the base layer
    (which that path would skip) sends it down the general path instead. Below it, with the kernels (fp32
    here), training takes the general path anyway: it forms nothing of out × in."""
    from sparse_peft import ops

    from .conftest import tiny_llama

    x = torch.randint(0, 128, (2, 9))
    config = SparseConfig(target_modules="all-linear", density=0.1, init_weights=False)
    fused = get_peft_model(tiny_llama(), config)
    general = get_peft_model(tiny_llama(), copy.deepcopy(config))
    for module in general.modules():
        if isinstance(module, SparseLayer):
            module.get_base_layer().register_forward_hook(lambda *a: None)
    q_proj = fused.base_model.model.model.layers[0].self_attn.q_proj
    path = lambda: type(q_proj(torch.randn(1, 3, 32, requires_grad=True)).grad_fn).__name__  # noqa: E731
    assert path() == "MergedSparseLinearBackward"  # 10% dense
    monkeypatch.setattr(ops, "SCRATCH_TRAIN_ABOVE_DENSITY", 1.0)
    assert path() == "AddBackward0"
    monkeypatch.setattr(ops, "sddmm_works", lambda device, dtype: False)
    assert path() == "MergedSparseLinearBackward"
    monkeypatch.undo()
    outs = []
    for model in (fused, general):
        out = model(x, labels=x)
        out.loss.backward()
        outs.append((out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for n in outs[0][1]:
        assert torch.allclose(outs[0][1][n], outs[1][1][n], atol=1e-5), n


@pytest.mark.parametrize("r", [0, 2])
def test_decoding_with_an_unmerged_adapter_matches_the_merged_model(r):
    # one token per step takes the gather product (no scratch weight); it must decode as the merged weights do
    from sparse_peft import ops

    from .conftest import tiny_llama

    config = SparseConfig(target_modules="all-linear", density=0.03, r=r, init_weights=False)
    model = get_peft_model(tiny_llama(), config).eval()
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    assert all(ops.product_mode(1, m.get_delta("default").values.numel(), *m.delta_shape) == "gather" for m in layers)
    prompt = torch.randint(0, 128, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        unmerged = model.generate(input_ids=prompt, **kwargs)
        merged = model.merge_and_unload().generate(input_ids=prompt, **kwargs)
    assert torch.equal(unmerged.sequences, merged.sequences)
    torch.testing.assert_close(torch.stack(unmerged.scores), torch.stack(merged.scores), rtol=1e-4, atol=1e-4)


def test_product_mode_picks_the_gather_for_few_tokens():
    from sparse_peft import ops

    # 4096² at 0.4 % (SpIEL at LoRA r=8's budget): a gather up to 16 tokens, dense row blocks after
    k = 8 * (4096 + 4096)
    assert ops.product_mode(1, k, 4096, 4096) == "gather"
    assert ops.product_mode(16, k, 4096, 4096) == "gather"
    assert ops.product_mode(17, k, 4096, 4096) == "dense"
    assert ops.product_mode(1024, 4096 * 4096 // 1000, 4096, 4096) == "sparse"
