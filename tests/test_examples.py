"""The examples/ scripts, in tiny runs: each method's train.py for 2 steps on a tiny Llama and a local jsonl file
built here, and LoRA-GGPO's double-descent demonstration in its reduced mode."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch


pytest.importorskip("trl")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
from sparse_peft import METHODS  # noqa: E402  (every discovered method has an example)



def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    # two threads on a shared 2-core machine are many times slower than one for these tiny matrices
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def make_tiny(root: Path) -> Path:
    """A tiny Llama with the quickstart's byte tokenizer, saved as a checkpoint, and a 48-line jsonl dataset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparse_peft.quickstart import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat tree big small red blue".split()
    with open(root / "data.jsonl", "w") as f:
        for _ in range(48):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(6))}) + "\n")
    return root


@pytest.mark.parametrize("method", METHODS)
def test_train_script_saves_an_adapter_that_reloads(method, tiny, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    script = _load(EXAMPLES / method / "train.py")
    script.main(["--model", str(tiny / "model"), "--dataset", str(tiny / "data.jsonl"), "--max_steps", "2",
                 "--batch_size", "4", "--max_length", "24", "--output_dir", str(out)])
    text = capsys.readouterr().out
    assert f"{method}: eval loss" in text and "after 2 steps" in text
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"), out)
    assert reloaded.peft_config["default"].method == method
    if method == "dsee":
        assert "pruned (unstructured)" in text and "after pruning" in text


def test_double_descent_reduced_mode_writes_its_plot(tmp_path, capsys):
    script = _load(EXAMPLES / "lora_ggpo" / "double_descent.py")
    script.main(["--steps", "5", "--seeds", "1", "--pretrain_steps", "20", "--output_dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert "lora" in text and "ggpo" in text and "rise" in text
    assert (tmp_path / "double_descent.png").stat().st_size > 1000


def test_the_distributed_configs_are_accelerate_configs_that_say_what_the_docs_say():
    # what `accelerate launch --config_file ...` reads: FSDP2 (FSDP1 is refused for per-step work), and ZeRO-3 with
    # the 16-bit gathering on save (without it the Trainer's save would be empty, refused at the start), bf16
    from accelerate.commands.config.config_args import load_config_from_file

    folder = EXAMPLES / "distributed"
    fsdp = load_config_from_file(str(folder / "fsdp2.yaml"))
    assert fsdp.distributed_type == "FSDP" and int(fsdp.fsdp_config["fsdp_version"]) == 2
    zero3 = load_config_from_file(str(folder / "zero3.yaml"))
    assert zero3.distributed_type == "DEEPSPEED" and zero3.mixed_precision == "bf16"
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.deepspeed_config["zero3_save_16bit_model"] is True
    ds = json.loads((folder / "zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
