"""Every method under DeepSpeed ZeRO-2 and ZeRO-3 (two gloo CPU ranks) ends with the adapter DDP ends with.

Needs `pip install --no-build-isolation deepspeed` (the `deepspeed` extra) and runs with DS_ACCELERATOR=cpu;
skipped without it. Each rank trains the same model on its own data, once wrapped in DDP (tests/methods/
test_fsdp.py's loop) and once in a DeepSpeed engine driven by hand (engine.backward, engine.step), the
optimizer torch's AdamW on DeepSpeed's fp32 partitions. The per-step work reads and writes whole values,
gradients and optimizer state through DeepSpeed's accessors (sparse_peft/full.py). Equal within 1e-6,
indices exactly; the adapter saved under ZeRO-3 loads into one process.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..conftest import assert_loads_as_trained, assert_same_adapter, spawn_runs
from .test_fsdp import SETUPS as SCHEDULED, STEPS, _train as _train_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

SETUPS = {
    **SCHEDULED,  # tests/methods/test_fsdp.py's: the methods with per-step work
    # no per-step work: the forward and backward under partitioned parameters, and the saved file
    "dsee": dict(method="dsee", r=2, density=0.05),
    "s2ft": dict(method="s2ft"),
    "sltrain": dict(method="sltrain", r=2, density=0.05),
    "paca": dict(method="paca", num_columns=2),
}
# DeepSpeed steps a whole parameter group at once, so RoSA's sparse part cannot start its Adam bias
# correction at the mask's step as a torch optimizer does (it warns): the same mask, other values
SAME_MASK_ONLY = {"rosa"}
STAGES = (2, 3)


def _train(stage: int, fields: dict, rank: int, save_to: str = "") -> dict:
    import deepspeed
    from peft import get_peft_model

    from sparse_peft import SparseConfig, SparseLayer, SparseScheduler
    from sparse_peft.full import full
    from tests.conftest import tiny_llama

    torch.manual_seed(0)  # the same model and start support on every rank
    model = get_peft_model(tiny_llama().train(), SparseConfig(target_modules="all-linear", **fields))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,  # the reference loop does not clip
        # every parameter partitioned, however small (ZeRO-3 keeps ones under 1e5 elements whole by default)
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        # torch's AdamW, as the reference loop's (its defaults: weight decay 0.01)
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    if stage == 3:  # outside forward the values hold nothing of their own: the per-step work must ask DeepSpeed
        values = next(p for n, p in model.named_parameters() if "sparse_" in n)
        assert values.numel() == 0 and values.ds_numel > 0
    SparseScheduler(engine, engine, total_steps=STEPS + 2)
    torch.manual_seed(100 + rank)  # different data on each rank
    for _ in range(STEPS):
        ids = torch.randint(0, 128, (2, 10))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    if save_to:  # every rank gathers the partitioned tensors; one writes
        model.save_pretrained(save_to, is_main_process=rank == 0)
    state = {k: full(p).clone() for k, p in model.named_parameters() if "sparse_" in k}
    state.update({k: b.clone() for k, b in model.named_buffers() if "sparse_" in k})
    for key, layer in model.named_modules():
        if isinstance(layer, SparseLayer) and "default" in layer.sparse_noise:
            state[f"{key}.noise_std"] = layer.sparse_noise["default"][0].clone()
    engine.destroy()
    return state


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    import sparse_peft  # noqa: F401
    from tests.conftest import close_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the group above
    for name, fields in SETUPS.items():
        torch.save(_train_reference("ddp", fields, rank), os.path.join(out_dir, f"{name}-ddp-rank{rank}.pt"))
        for stage in STAGES:
            save_to = os.path.join(out_dir, f"{name}-adapter") if stage == 3 else ""
            state = _train(stage, fields, rank, save_to)
            torch.save(state, os.path.join(out_dir, f"{name}-zero{stage}-rank{rank}.pt"))
    close_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn_runs(tmp_path_factory, _worker, "deepspeed", SETUPS, ["ddp"] + [f"zero{s}" for s in STAGES])


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_deepspeed_ends_with_the_adapter_ddp_ends_with(runs, name, stage):
    # ZeRO-3 hooks every module, so its layers take the general path (base GEMM + the update's product), not the
    # fused one-GEMM path DDP takes: another float order, which Adam's normalisation magnifies on tiny gradients
    # (SLTrain's ends 1.4e-6 away). The methods with per-step work are held to 1e-6 under both stages.
    scheduled = name in SCHEDULED
    assert_same_adapter(runs[(name, "ddp", 0)], runs[(name, f"zero{stage}", 0)], runs[(name, f"zero{stage}", 1)],
                        atol=1e-6 if stage == 2 or scheduled else 1e-5,
                        skip=lambda key: name in SAME_MASK_ONLY and "indices" not in key)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_an_adapter_saved_under_zero3_is_whole_and_loads_into_one_process(runs, name):
    assert_loads_as_trained(runs["folder"] / f"{name}-adapter", runs[(name, "zero3", 0)])


# -- the front door: the HF Trainer and TRL's SFTTrainer with a DeepSpeed ZeRO-3 config ------------------------
# accelerate on CPU counts one process under DeepSpeed whatever the launcher says (each rank would train on the same
# batches), so the trainers run as one rank: ZeRO-3 still empties every parameter outside forward, the base is
# partitioned as it loads (zero.Init, the model made after the TrainingArguments), and the optimizer steps
# DeepSpeed's fp32 partitions. The same runs without DeepSpeed are the reference.
TRAINER_RUNS = {
    "spiel": dict(method="spiel", density=0.05, reselection_steps=3, accumulation_steps=2),
    "sara": dict(method="sara", density=0.05, nuclear_norm_weight=0.05, nuclear_norm_layers=14, progressive_step=3),
    "lora_ggpo": dict(method="lora_ggpo", perturbation_sigma=0.3, perturbation_beta=1.0),
    "sft-spiel": dict(method="spiel", density=0.05, reselection_steps=3, accumulation_steps=2),  # TRL's SFTTrainer
}
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
}


def _trainer_worker(rank: int, engine: str, port: int, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from sparse_peft import SparseConfig
    from tests.test_trl import _texts, _tokenizer

    ids = torch.randint(0, 18, (24, 10), generator=torch.Generator().manual_seed(5))
    for name, fields in TRAINER_RUNS.items():
        common = dict(output_dir=os.path.join(out, engine, name), per_device_train_batch_size=2, max_steps=6,
                      learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no",
                      train_sampling_strategy="sequential", disable_tqdm=True, seed=0, bf16=False,
                      deepspeed=ZERO3 if engine == "zero3" else None, use_cpu=engine != "zero3")
        args = SFTConfig(max_length=12, **common) if name.startswith("sft-") else TrainingArguments(**common)
        # made after the arguments: under ZeRO-3 it is partitioned as it loads (zero.Init)
        base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base")).train()
        config = SparseConfig(target_modules="all-linear", **fields)
        if name.startswith("sft-"):
            trainer = SFTTrainer(model=base, args=args, peft_config=config,
                                 train_dataset=Dataset.from_dict({"text": _texts(24)}), processing_class=_tokenizer())
        else:
            data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
            trainer = Trainer(model=get_peft_model(base, config), args=args, train_dataset=data)
        if engine == "zero3":
            assert trainer.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.numel() == 0
        trainer.train()
        trainer.save_model(os.path.join(out, engine, name, "final"))
        del trainer


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    pytest.importorskip("trl")
    from tests.test_trl import _model

    folder = tmp_path_factory.mktemp("deepspeed-trainer")
    _model().save_pretrained(folder / "base")
    for port, engine in enumerate(("plain", "zero3"), start=29620):
        mp.spawn(_trainer_worker, args=(engine, port, str(folder)), nprocs=1, join=True)
    return folder


@pytest.mark.parametrize("name", sorted(TRAINER_RUNS))
def test_the_trainers_under_zero3_end_with_the_adapter_they_end_with_alone(trainer_runs, name):
    from safetensors.torch import load_file

    plain = load_file(trainer_runs / "plain" / name / "final" / "adapter_model.safetensors")
    zero3 = load_file(trainer_runs / "zero3" / name / "final" / "adapter_model.safetensors")
    assert plain.keys() == zero3.keys() and plain
    for key in plain:
        if plain[key].dtype in (torch.int32, torch.int64):
            assert torch.equal(plain[key], zero3[key]), key
        else:
            # 1e-5 (a thousandth of one step at lr 1e-2): Adam's normalisation magnifies the float order of DeepSpeed's
            # reductions on entries with tiny gradients; a penalty or noise gone astray moves them by 1e-2
            torch.testing.assert_close(zero3[key], plain[key], rtol=0, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_a_zero3_trainer_that_would_save_an_empty_adapter_is_refused_at_the_start():
    from peft import get_peft_model
    from transformers import TrainerControl, TrainerState
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from sparse_peft import SparseConfig
    from sparse_peft.callbacks import SparseCallback

    from ..conftest import tiny_llama

    model = get_peft_model(tiny_llama(), SparseConfig(method="dsee", target_modules="all-linear"))
    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})  # noqa: F841
    try:
        with pytest.raises(ValueError, match="zero3_save_16bit_model: true"):
            SparseCallback().on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    finally:
        unset_hf_deepspeed_config()


def test_accelerate_launch_with_the_zero3_config_runs_the_example_and_matches_a_plain_run(tmp_path):
    # the documented command, as one CPU process (examples/distributed/zero3.yaml; bf16 is a GPU setting)
    import subprocess
    import sys

    from safetensors.torch import load_file

    from ..test_examples import EXAMPLES, make_tiny

    root = make_tiny(tmp_path)
    common = ["--model", str(root / "model"), "--dataset", str(root / "data.jsonl"), "--max_steps", "4",
              "--batch_size", "4", "--max_length", "24", "--output_dir"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(EXAMPLES / "distributed" / "zero3.yaml"), "--num_processes", "1", "--mixed_precision", "no",
                  "--main_process_port", "29640"]
    script = str(EXAMPLES / "spiel" / "train.py")
    runs = {"zero3": accelerate + [script] + common + [str(tmp_path / "zero3")],
            "plain": [sys.executable, script] + common + [str(tmp_path / "plain")]}
    for name, command in runs.items():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "spiel: eval loss" in done.stdout, (name, done.stdout[-2000:], done.stderr[-4000:])
    plain, zero3 = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("plain", "zero3"))
    assert plain.keys() == zero3.keys()
    for key in plain:
        torch.testing.assert_close(zero3[key], plain[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
