"""The `sparse-peft` command: flags or YAML in, a trained adapter out, on a tiny Llama saved to a local folder."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch


trl = pytest.importorskip("trl")

from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import sparse_peft  # noqa: E402
from sparse_peft import cli  # noqa: E402


WORDS = "the a cat dog sat ran on under mat tree big small red blue".split()
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# a few short CPU steps; gradient checkpointing (SFTConfig's default) only costs time here
FAST = ("--max_steps 2 --per_device_train_batch_size 4 --max_length 16 --learning_rate 1e-2 --use_cpu "
        "--report_to none --save_strategy no --disable_tqdm true --gradient_checkpointing false").split()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """What an offline user has: a model folder (weights and tokenizer) and a jsonl file with a "text" column."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(root / "base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )).save_pretrained(root / "base")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(32):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(8))}) + "\n")
    return root


def sources(local):
    return ["--model_name_or_path", str(local / "base"), "--dataset_name", str(local / "data.jsonl")]


def reload(local, folder):
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local / "base"), folder)


def assert_reloads_as_saved(local, folder):
    file = load_file(folder / "adapter_model.safetensors")
    state = get_peft_model_state_dict(reload(local, folder))
    assert state.keys() == file.keys() and all(torch.equal(state[k], file[k]) for k in file)
    assert any(v.is_floating_point() and v.abs().sum() > 0 for v in file.values())  # it trained: values start at 0
    return file


def test_flags_train_a_loadable_adapter_with_the_given_fields(local, tmp_path):
    assert cli.main([
        *sources(local), "--output_dir", str(tmp_path), *FAST, "--method", "spiel", "--density", "0.05",
        "--target_modules", "all-linear", "--module_density", '{"o_proj": 0.2}', "--reselection_steps", "2",
        "--accumulation_steps", "1", "--sparse_seed", "3", "--seed", "1",
    ]) == 0
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPARSE" and saved["task_type"] == "CAUSAL_LM"
    assert (saved["method"], saved["density"], saved["module_density"]) == ("spiel", 0.05, {"o_proj": 0.2})
    knobs = saved["method_config"]  # the method's own knobs, nested
    assert (knobs["reselection_steps"], knobs["accumulation_steps"], saved["seed"]) == (2, 1, 3)
    assert saved["structure"] == "unstructured" and saved["r"] == 0  # unset: the method's preset
    assert {name.rsplit(".", 1)[-1] for name in saved["target_modules"]} == LINEAR  # PEFT expands all-linear
    assert_reloads_as_saved(local, tmp_path)


def test_yaml_config_with_list_and_dict_fields_and_a_flag_that_overrides_it(local, tmp_path, monkeypatch):
    calls = []

    def spy(model, batches, **kwargs):  # the real calibration, counting the batches it gets
        batches = list(batches)
        calls.append(len(batches))
        return calibrate(model, batches, **kwargs)

    calibrate = sparse_peft.calibrate
    monkeypatch.setattr(sparse_peft, "calibrate", spy)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {local / 'base'}\ndataset_name: {local / 'data.jsonl'}\noutput_dir: {tmp_path / 'out'}\n"
        "structure: columns\nselection: activation\ncalibration_batches: 2\ndensity: 0.5\n"
        "target_modules: [o_proj, down_proj]\nlayers_to_transform: [1]\nmodule_density: {down_proj: 0.5}\n"
    )
    assert cli.main(["--config", str(config), *FAST, "--density", "0.25"]) == 0
    assert calls == [2]
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == {"o_proj", "down_proj"} and saved["layers_to_transform"] == [1]
    assert (saved["density"], saved["module_density"]) == (0.25, {"down_proj": 0.5})  # the flag wins over the YAML
    file = assert_reloads_as_saved(local, tmp_path / "out")
    columns = {".".join(k.split(".")[-3:-1]): v for k, v in file.items() if k.endswith("sparse_col_index")}
    assert all(".layers.1." in k for k in file)
    assert {k: v.numel() for k, v in columns.items()} == {"self_attn.o_proj": 8, "mlp.down_proj": 32}  # of 32, 64


def test_push_to_hub_uploads_the_adapter(local, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    hub = tmp_path / "hub"

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        ignore = shutil.ignore_patterns(*ignore_patterns)
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True, ignore=ignore)

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    cli.main([*sources(local), "--output_dir", str(tmp_path / "out"), *FAST, "--max_steps", "1", "--density", "0.1",
              "--push_to_hub", "--hub_model_id", "someone/sparse-adapter", "--hub_token", "not-used"])
    pushed = hub / "someone/sparse-adapter"
    assert json.loads((pushed / "adapter_config.json").read_text())["density"] == 0.1
    assert load_file(pushed / "adapter_model.safetensors").keys() == load_file(
        tmp_path / "out" / "adapter_model.safetensors").keys()
    assert_reloads_as_saved(local, pushed)


def test_an_adapter_trained_on_a_relative_base_folder_loads_from_any_directory(local, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(local)  # the base and the data given relative to the working directory, as in docs/cli.md
    assert cli.main(["--model_name_or_path", "base", "--dataset_name", "data.jsonl", "--output_dir",
                     str(tmp_path / "out"), *FAST, "--max_steps", "1", "--density", "0.1"]) == 0
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((local / "base").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[2, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reload(local, tmp_path / "out")(ids).logits)


# parsing alone needs no model or data; --use_cpu keeps SFTConfig from asking for a GPU
UNUSED = ["--model_name_or_path", "m", "--dataset_name", "d", "--use_cpu"]


def test_command_line_values_become_sparse_config_fields():
    def config(*flags):
        return cli.parse([*UNUSED, *flags])[-1]

    c = config("--target_modules", "q_proj", "v_proj", "--layers_to_transform", "0", "--exclude_modules", r".*\.0\..*",
               "--trainable_token_indices", '{"embed_tokens": [1, 2]}', "--disjoint_from", "other",
               "--init_weights", "false")
    assert c.target_modules == {"q_proj", "v_proj"} and c.layers_to_transform == [0]
    assert c.exclude_modules == r".*\.0\..*"  # a regex stays one string, as PEFT reads it
    assert c.trainable_token_indices == {"embed_tokens": [1, 2]} and c.disjoint_from == ["other"]
    assert c.init_weights is False
    c = config("--target_modules", "all-linear", "--layers_to_transform", "[0, 1]", "--structure", "columns",
               "--head_groups")
    assert c.target_modules == "all-linear" and c.layers_to_transform == [0, 1] and c.head_groups is True
    assert config("--target_modules", "o_proj").target_modules == {"o_proj"}  # one name: a list, matched by suffix
    c = config("--method", "s2ft", "--seed", "5")  # unset fields: the preset; --seed is the training seed
    assert (c.structure, c.head_groups, c.density, c.seed) == ("columns", True, 0.05, 0)


@pytest.mark.parametrize("flags, messages", [
    (["--density", "2"], ["invalid SparseConfig: density=2.0 must be in (0, 1]"]),
    (["--structure", "diagonal"], ["--structure: invalid choice: 'diagonal'"]),
    (["--module_density", "o_proj"], ["--module_density: expects JSON"]),
    (["--layers_to_transform", "first"], ["--layers_to_transform: invalid literal"]),
    (["--lora_r", "8"], ["--lora_r is a LoRA option", "not TRL's LoRA config: use --r"]),
    (["--use-peft"], ["--use_peft is a LoRA option"]),
    (["yaml", "lora_target_modules: [q_proj]"], ["--lora_target_modules is a LoRA option", "use --target_modules"]),
])
def test_bad_options_exit_with_a_message_naming_them(flags, messages, tmp_path, capsys):
    if flags[0] == "yaml":
        (tmp_path / "run.yaml").write_text(flags[1])
        flags = ["--config", str(tmp_path / "run.yaml")]
    with pytest.raises(SystemExit) as exit:
        cli.main([*UNUSED, *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert all(m in err for m in messages), err


def test_help_lists_every_sparse_config_field(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    flags = set(cli.make_parser().sparse_flags)
    assert {"sparse_seed", "module_density", "target_modules", "method"} <= flags
    assert "sparse_peft_version" not in flags and "task_type" not in flags
    assert all(f"--{flag} " in out for flag in flags) and "--calibration_batches" in out and "--lora_r" not in out
