"""Adapter files: what is written, and that bad files are refused before the model changes."""

from __future__ import annotations

import copy
import json
import warnings

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


# -- an adapter never loads into a base it does not fit (issue #13, item 2) ------------------------------
def _linear_pair(width: int, seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 8))


@pytest.mark.parametrize("method", ["spiel", "sara"])
def test_an_unstructured_adapter_is_refused_by_a_wider_base_whose_indices_it_would_fit(tmp_path, method):
    model = get_peft_model(_linear_pair(8), SparseConfig(method=method, target_modules=["0", "2"], init_weights=False))
    model.save_pretrained(tmp_path)
    wider = _linear_pair(16)  # 8×8 flat indices are all in range of a 16×16 weight
    x = torch.randn(3, 16)
    before = wider(x)
    with pytest.raises(ValueError, match=r"0: the adapter was trained on a weight of shape \(8, 8\), but this model's "
                                         r"is \(16, 16\); the adapter was trained on another base model"):
        PeftModel.from_pretrained(wider, tmp_path)
    assert not any(isinstance(m, SparseLayer) for m in wider.modules()) and torch.equal(wider(x), before)


def test_an_s2ft_adapter_is_refused_by_another_ffn_width(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(ffn):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=ffn, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))

    get_peft_model(llama(64), SparseConfig(method="s2ft")).save_pretrained(tmp_path)
    other = llama(96)  # down_proj's chosen columns are all below 64: in range of the wider FFN too
    with pytest.raises(ValueError, match=r"down_proj: the adapter was trained on a weight of shape \(32, 64\), but "
                                         r"this model's is \(32, 96\)"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, SparseLayer) for m in other.modules())


def test_a_file_without_shape_records_still_loads_and_says_so(saved):
    base, path, out = saved
    _tamper(path, lambda t: [t.pop(k) for k in list(t) if k.endswith("sparse_weight_shape")])
    with pytest.warns(UserWarning, match="no weight-shape records"):
        model = PeftModel.from_pretrained(copy.deepcopy(base), path)
    torch.testing.assert_close(model(X).logits, out)


def test_a_malformed_shape_record_is_refused(saved):
    base, path, _ = saved
    _tamper(path, lambda t: t.__setitem__(_key(t, "sparse_weight_shape"), torch.tensor([1.5, 2.0])))
    fresh = copy.deepcopy(base)
    original = fresh(X).logits
    with pytest.raises(ValueError, match="sparse_weight_shape is missing or malformed"):
        PeftModel.from_pretrained(fresh, path)
    _assert_untouched(fresh, original)


@pytest.mark.parametrize("cut", [10, 2000, -100])
def test_a_truncated_file_is_refused_naming_it_and_the_model_is_untouched(saved, cut):
    base, path, _ = saved
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:cut])
    fresh = copy.deepcopy(base)
    original = fresh(X).logits
    with pytest.raises(ValueError, match=f"cannot read the sparse adapter at '{path}'.*truncated or corrupt"):
        PeftModel.from_pretrained(fresh, path)
    _assert_untouched(fresh, original)
    # a second adapter from the same file: refused, the first one stays as it was
    model = get_peft_model(copy.deepcopy(base), SparseConfig(target_modules="all-linear", density=0.1, init_weights=False))
    out = model(X).logits
    with pytest.raises(ValueError, match="truncated or corrupt"):
        model.load_adapter(path, adapter_name="second")
    assert set(model.peft_config) == {"default"}
    assert all("second" not in m._all_available_adapter_names() for m in model.modules() if isinstance(m, SparseLayer))
    assert torch.equal(model(X).logits, out)


def test_sltrain_with_an_edited_seed_is_refused_and_a_clean_load_reports_no_missing_keys(tmp_path):
    model = get_peft_model(tiny_llama(), SparseConfig(method="sltrain", target_modules="all-linear", init_weights=False))
    out = model(X).logits
    model.save_pretrained(tmp_path)
    assert not any(k.endswith("sparse_indices") for k in load_file(tmp_path / "adapter_model.safetensors"))
    with warnings.catch_warnings():  # PEFT warns "Found missing adapter keys" for what a load did not fill
        warnings.filterwarnings("error", message="Found missing adapter keys")
        again = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(again(X).logits, out)
    result = again.load_adapter(tmp_path, adapter_name="second")
    assert result.missing_keys == [] and result.unexpected_keys == []

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["seed"] += 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny_llama()
    original = fresh(X).logits
    with pytest.raises(ValueError, match=r"the support regenerated from seed=1 is not the one this adapter was trained"):
        PeftModel.from_pretrained(fresh, tmp_path)
    _assert_untouched(fresh, original)

