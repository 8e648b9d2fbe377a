"""Adapter files: what is written, and that bad files are refused before the model changes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import sparse_peft
from sparse_peft import SparseConfig, SparseLayer

from .conftest import tiny_llama


X = torch.randint(0, 128, (2, 9))


@pytest.fixture
def saved(tmp_path):
    base = tiny_llama()
    config = SparseConfig(target_modules="all-linear", density=0.1, r=2, init_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    out = model(X).logits
    model.save_pretrained(tmp_path)
    return base, tmp_path, out


def _tamper(path, edit):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _key(tensors, suffix, layer="layers.0.self_attn.q_proj"):
    return next(k for k in tensors if layer in k and k.endswith(suffix))


def _assert_untouched(base, original_out):
    assert not any(isinstance(m, SparseLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    assert torch.equal(base(X).logits, original_out)


def test_adapter_config_records_type_method_and_version(saved):
    _, path, _ = saved
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSE"
    assert config["sparse_peft_version"] == sparse_peft.__version__
    assert config["structure"] == "unstructured" and config["r"] == 2
    tensors = load_file(path / "adapter_model.safetensors")
    assert {t.dtype for k, t in tensors.items() if k.endswith("sparse_indices")} == {torch.int32}


CORRUPTIONS = {
    "index out of range": (lambda t: t[_key(t, "sparse_indices")].__setitem__(-1, 10**6), "outside"),
    "negative index": (lambda t: t[_key(t, "sparse_indices")].__setitem__(0, -1), "outside"),
    "duplicate index": (lambda t: t[_key(t, "sparse_indices")].__setitem__(1, t[_key(t, "sparse_indices")][0]), "sorted and unique"),
    "float indices": (lambda t: t.__setitem__(_key(t, "sparse_indices"), t[_key(t, "sparse_indices")].float()), "int32 or int64"),
    "values of the wrong length": (lambda t: t.__setitem__(_key(t, "sparse_values"), torch.zeros(3)), "shape"),
    "NaN values": (lambda t: t[_key(t, "sparse_values")].__setitem__(0, float("nan")), "NaN"),
    "integer values": (lambda t: t.__setitem__(_key(t, "sparse_values"), torch.zeros_like(t[_key(t, "sparse_values")], dtype=torch.int32)), "floating point"),
    "low-rank factor of the wrong shape": (lambda t: t.__setitem__(_key(t, "sparse_lora_A"), torch.zeros(3, 5)), "shape"),
    "missing values": (lambda t: t.pop(_key(t, "sparse_values")), "but its config asks for"),
    "missing layer": (lambda t: [t.pop(k) for k in list(t) if "layers.1.mlp.up_proj" in k], "no tensors for"),
    "unknown layer": (lambda t: t.__setitem__("base_model.model.model.layers.7.mlp.up_proj.sparse_values", torch.zeros(2)), "does not adapt"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_file_is_refused_and_the_base_is_left_as_it_was(saved, corruption):
    base, path, _ = saved
    edit, message = CORRUPTIONS[corruption]
    _tamper(path, edit)
    fresh = copy.deepcopy(base)
    original = fresh(X).logits
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(fresh, path)
    _assert_untouched(fresh, original)


def test_corrupt_second_adapter_leaves_the_first_intact(saved, tmp_path_factory):
    base, path, out = saved
    model = PeftModel.from_pretrained(copy.deepcopy(base), path)
    _tamper(path, CORRUPTIONS["index out of range"][0])
    with pytest.raises(ValueError, match="outside"):
        model.load_adapter(path, adapter_name="second")
    assert "second" not in model.peft_config
    assert all("second" not in m._all_available_adapter_names() for m in model.modules() if isinstance(m, SparseLayer))
    assert torch.allclose(model(X).logits, out, atol=1e-6)


def test_adapter_for_another_base_model_is_refused(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, path, _ = saved
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    )
    with pytest.raises(ValueError, match="another base model"):
        PeftModel.from_pretrained(other, path)
    assert not any(isinstance(m, SparseLayer) for m in other.modules())


def test_a_support_of_another_size_loads(saved):
    """Supports may change size during training (progressive selection): the file decides."""
    base, path, _ = saved

    def shrink(t):
        for k in [k for k in t if k.endswith("sparse_indices")]:
            t[k] = t[k][:5].contiguous()
            values = k.replace("sparse_indices", "sparse_values")
            t[values] = t[values][:5].contiguous()

    _tamper(path, shrink)
    model = PeftModel.from_pretrained(copy.deepcopy(base), path)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.sparse_values["default"].shape == (5,) and layer.sparse_indices["default"].dtype == torch.int32
    tensors = load_file(path / "adapter_model.safetensors")
    assert torch.equal(layer.sparse_values["default"], tensors[_key(tensors, "sparse_values")])


def test_auto_peft_model_and_push_to_hub_through_local_folders(tmp_path, monkeypatch):
    """AutoPeftModel resolves the base from a local folder; push_to_hub runs the real save path."""
    from huggingface_hub import HfApi
    from peft import AutoPeftModelForCausalLM

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(copy.deepcopy(base), SparseConfig(target_modules="all-linear", init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    out = model(X).logits

    hub = tmp_path / "hub"
    uploaded = {}

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            target = hub / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            data = op.path_or_fileobj
            target.write_bytes(data.read() if hasattr(data, "read") else open(data, "rb").read())
            uploaded[op.path_in_repo] = target

        class Info:
            commit_url = oid = pr_url = ""
        return Info()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model.push_to_hub("someone/sparse-adapter", token="not-used")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(uploaded)
    # (transformers' push_to_hub replaces PEFT's model card with a generic one: our own card is issue #6)

    model.save_pretrained(tmp_path / "local")
    card = (tmp_path / "local" / "README.md").read_text()
    assert "library_name: peft" in card and "sparse_peft" in card

    loaded = AutoPeftModelForCausalLM.from_pretrained(hub / "someone/sparse-adapter")
    assert torch.allclose(loaded(X).logits, out, atol=1e-6)


def test_model_card_says_what_the_adapter_is_and_how_to_load_it(tmp_path):
    model = get_peft_model(tiny_llama(), SparseConfig(method="spiel", target_modules="all-linear"))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again refreshes our section rather than adding a second
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Sparse adapter (sparse_peft)") == 1
    assert "import sparse_peft" in card and "arxiv.org/abs/2401.16405" in card
    assert f"sparse_peft {sparse_peft.__version__}" in card and "library_name: peft" in card
    n = sum(m.get_delta("default").num_trainable() for m in model.modules() if isinstance(m, SparseLayer))
    assert f"{n:,} trainable parameters" in card
