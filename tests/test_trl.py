"""TRL trainers with `peft_config=SparseConfig(...)`, on a tiny Llama and a word-level tokenizer built in code."""

from __future__ import annotations

import random

import pytest
import torch


trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402

import sparse_peft  # noqa: E402
from sparse_peft import METHODS, SparseConfig  # noqa: E402

from .conftest import method_config  # noqa: E402


WORDS = "the a cat dog sat ran on under mat tree big small red blue".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(WORDS) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return LlamaForCausalLM(cfg)


def _texts(n):
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(n)]


COMMON = dict(per_device_train_batch_size=4, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True)


def test_sft_trainer_runs_spiel_regrowth_and_saves_a_loadable_adapter(tmp_path):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, max_length=16, **COMMON)
    config = SparseConfig(method="spiel", target_modules="all-linear", reselection_steps=2, accumulation_steps=1)
    trainer = SFTTrainer(
        model=_model(), args=args, train_dataset=Dataset.from_dict({"text": _texts(32)}),
        processing_class=_tokenizer(), peft_config=config,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "sparse/churn" in h]
    assert [h["step"] for h in logged] == [1, 3]
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(_model(), tmp_path / "adapter")
    ours = lambda m: {k: v for k, v in m.state_dict().items() if "sparse_" in k}  # noqa: E731
    trained, loaded = ours(trainer.model), ours(reloaded)
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_dpo_trainer_trains_a_sparse_adapter(tmp_path):
    from trl import DPOConfig, DPOTrainer

    texts = _texts(32)
    data = Dataset.from_dict({"prompt": texts[:16], "chosen": texts[16:], "rejected": texts[:16][::-1]})
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, max_length=32, learning_rate=1e-2, **COMMON)
    trainer = DPOTrainer(
        model=_model(), args=args, train_dataset=data, processing_class=_tokenizer(),
        peft_config=SparseConfig(target_modules="all-linear", density=0.1),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and all("sparse_" in n for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def _deltas(model):
    from sparse_peft import SparseLayer

    return [m.get_delta("default") for m in model.modules() if isinstance(m, SparseLayer)]


# every discovered method; no test attaches anything: the trainers run the schedules by themselves
ALL_METHODS = sorted(METHODS)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sft_trainer_trains_saves_and_reloads_every_method(tmp_path, method):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, max_length=16, learning_rate=1e-2, **COMMON)
    trainer = SFTTrainer(
        model=_model(), args=args, train_dataset=Dataset.from_dict({"text": _texts(16)}),
        processing_class=_tokenizer(), peft_config=method_config(method, target_modules="all-linear"),
    )
    trainer.train()
    # every update starts at zero; SaRA's progressive step may have moved all of it into frozen buffers
    assert any(float(d.dense().abs().sum()) > 0 for d in _deltas(trainer.model))
    config = trainer.model.peft_config["default"]
    if config.method_impl.has_steps(config) and config.method_impl.steps.__qualname__ != "Method.steps":
        # a method with work between steps logs it (SpIEL only at its reselections, after this short run)
        logged = {k for h in trainer.state.log_history for k in h if k.startswith("sparse/")}
        assert logged or method == "spiel", method
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(_model(), tmp_path / "adapter")
    ours = lambda m: {k: v for k, v in m.state_dict().items() if "sparse_" in k}  # noqa: E731
    trained, loaded = ours(trainer.model), ours(reloaded)
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_dpo_trainer_trains_every_method(tmp_path, method):
    from trl import DPOConfig, DPOTrainer

    texts = _texts(16)
    data = Dataset.from_dict({"prompt": texts[:8], "chosen": texts[8:], "rejected": texts[:8][::-1]})
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, max_length=24, learning_rate=1e-2, **COMMON)
    trainer = DPOTrainer(
        model=_model(), args=args, train_dataset=data, processing_class=_tokenizer(),
        peft_config=method_config(method, target_modules="all-linear"),
    )
    trainer.train()
    assert any(float(d.dense().abs().sum()) > 0 for d in _deltas(trainer.model))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_grpo_trainer_trains_every_method(tmp_path, method):
    # RL with rollouts: generation runs through the unmerged adapter (the few-token gather path)
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **kwargs):
        return [float(c.count("cat")) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, num_generations=4, max_completion_length=6,
                      learning_rate=1e-2, **COMMON)
    trainer = GRPOTrainer(
        model=_model(), reward_funcs=[reward], args=args, train_dataset=Dataset.from_dict({"prompt": _texts(8)}),
        processing_class=_tokenizer(), peft_config=method_config(method, target_modules="all-linear"),
    )
    trainer.train()
    assert any("reward" in h for h in trainer.state.log_history)
    assert any(float(d.dense().abs().sum()) > 0 for d in _deltas(trainer.model))
