"""Small models built in code (no Hub access): the shapes PEFT's own test-suite uses."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: the models here are tiny, so a second thread buys nothing, and on a busy or shared
# machine a stalled thread holds every small matmul at its barrier (seen: 60x slower).
torch.set_num_threads(1)


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 16, bias=bias)
        self.head = nn.Linear(16, 2)

    def forward(self, X):
        return self.head(self.relu(self.lin1(self.relu(self.lin0(X.float())))))


class EmbConv1D(nn.Module):
    """GPT-2 style: transformers' Conv1D stores its weight as (in × out)."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(100, 12)
        self.conv1d = Conv1D(16, 12)
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(16, 2)

    def forward(self, X):
        return self.lin0(self.relu(self.conv1d(self.emb(X))))


class Conv2dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(8 * 5 * 5, 2)

    def forward(self, X):
        return self.lin0(self.relu(self.conv2d(X.float())).flatten(1))


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


# name, model factory, example-input factory, target_modules
CUSTOM_MODELS = {
    "mlp": (MLP, lambda: torch.randn(4, 10), ["lin0", "lin1"]),
    "conv1d": (EmbConv1D, lambda: torch.randint(0, 100, (4, 5)), ["conv1d"]),
    "conv2d": (Conv2dModel, lambda: torch.randn(2, 3, 5, 5), ["conv2d"]),
    "llama": (tiny_llama, lambda: torch.randint(0, 128, (2, 9)), "all-linear"),
    "gpt2": (tiny_gpt2, lambda: torch.randint(0, 128, (2, 9)), "all-linear"),
}


def run(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(params=sorted(CUSTOM_MODELS))
def case(request):
    factory, make_input, targets = CUSTOM_MODELS[request.param]
    torch.manual_seed(0)
    return request.param, factory, make_input(), targets


def trainer_run_and_resume(tmp_path, config_fn, examples: int, max_steps: int, save_steps: int):
    """Trains a tiny Llama with the HF Trainer and SparseCallback twice: straight through (which also
    writes checkpoint-`save_steps`), then resumed from that checkpoint. Returns both runs' sparse_ tensors."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from sparse_peft import SparseCallback

    def run(resume=None):
        torch.manual_seed(0)
        data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (examples, 12))]
        model = get_peft_model(tiny_llama().train(), config_fn())
        args = TrainingArguments(
            output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=1e-2,
            save_strategy="steps", save_steps=save_steps, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
            lr_scheduler_type="constant",
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        SparseCallback.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in model.state_dict().items() if "sparse_" in k}

    full = run()
    return full, run(resume=str(tmp_path / "run" / f"checkpoint-{save_steps}"))



def method_config(method: str, **kwargs):
    """SparseConfig of a method for the short runs of the shared per-method suites: a warm-up (RoSA's) of one step."""
    from sparse_peft import METHODS, SparseConfig
    from sparse_peft.methods import knob_fields

    if "warmup_steps" in {f.name for f in knob_fields(METHODS[method])} and "warmup_steps" not in kwargs:
        kwargs["warmup_steps"] = 1
    return SparseConfig(method=method, **kwargs)


def close_process_group() -> None:
    """End a spawned rank's process group after freeing every DDP / FSDP object that holds it: one destroyed
    after destroy_process_group hung a gloo rank at exit (about 1 run in 20), leaving its test waiting forever."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def assert_same_adapter(reference: dict, run: dict, other_rank: dict, atol: float, skip=lambda key: False) -> None:
    """A distributed run's adapter (a state dict of whole tensors) is the reference's: indices and frozen slots
    exactly, the rest within atol; and the other rank holds the very same whole adapter."""
    assert reference.keys() == run.keys()
    for key in reference:
        if skip(key):
            continue
        if "indices" in key or "slots" in key:
            assert torch.equal(reference[key], run[key]), key
        else:
            torch.testing.assert_close(run[key], reference[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")
    for key in run:
        assert torch.equal(run[key], other_rank[key]), key


def assert_loads_as_trained(folder, trained: dict) -> None:
    """The adapter saved in `folder` under a sharding engine loads into one process holding what training ended with."""
    from peft import PeftModel

    import sparse_peft  # noqa: F401  (registers the adapter type)

    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    state = {k: v for k, v in loaded.state_dict().items() if "sparse_" in k}
    assert state.keys() == {k for k in trained if not k.endswith("noise_std")}
    for key, value in state.items():
        assert torch.equal(value, trained[key].to(value.dtype)), key


def spawn_runs(tmp_path_factory, worker, label: str, setups, engines) -> dict:
    """Run `worker(rank, world, init_file, folder)` on two spawned gloo ranks; it saves each setup's adapter per
    engine and rank as `{name}-{engine}-rank{r}.pt`. Returns them by (name, engine, rank), and the folder."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    folder = tmp_path_factory.mktemp(label)
    mp.spawn(worker, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    runs = {(name, engine, r): torch.load(folder / f"{name}-{engine}-rank{r}.pt", weights_only=True)
            for name in setups for engine in engines for r in range(2)}
    runs["folder"] = folder
    return runs
