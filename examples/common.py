"""What the six `examples/<method>/train.py` scripts share: flags, model, data, eval loss, save and reload.

With no flags everything is offline: the model is the quickstart's small Llama (pretrained on the
Python standard library's own source, built on first use and cached, as `python -m
sparse_peft.quickstart` does), the data the quickstart's task (paragraphs of Python's reference
manual, whole topics held out for eval). `--model` and `--dataset` take any causal LM and any
dataset that TRL's SFTTrainer takes, from the Hub or a local path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sparse_peft  # noqa: F401  registers the sparse methods with PEFT, so that adapters reload
from sparse_peft import quickstart


N_EVAL = 200  # held-out examples: enough for a stable loss, few enough to evaluate in seconds
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def parser(doc: str, method: str, lr: float) -> argparse.ArgumentParser:
    """The flags every script has; each script adds its method's knobs."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(method=method, embedded_lr=lr)
    p.add_argument("--model", help="Hub id or local folder of a causal LM (default: the quickstart's small Llama, "
                   "pretrained and cached on first use, a few minutes on CPU)")
    p.add_argument("--dataset", help="Hub id, local folder, or .jsonl/.json/.csv/.parquet/.txt file, with a 'text', "
                   "'messages' or 'prompt'/'completion' column (default: the quickstart's Python-manual task)")
    p.add_argument("--max_steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--output_dir", default=f"out/{method}-adapter",
                   help="where the adapter goes (default %(default)s; out/ is git-ignored)")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload the adapter to this Hub repo")
    p.add_argument("--learning_rate", type=float,
                   help=f"default {lr:g} on the embedded model, 1e-4 with --model (a starting point: tune it)")
    p.add_argument("--batch_size", type=int, default=16, help="per-device batch size (default 16)")
    p.add_argument("--max_length", type=int,
                   help="tokens per example (default 64 on the embedded model, 512 with --model)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    # the embedded model is tiny and byte-level: it wants a large rate and counts bytes, not words
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.model else args.embedded_lr
    if args.max_length is None:
        args.max_length = 512 if args.model else quickstart.FT_LEN
    return args


def embedded_model() -> str:
    """The quickstart's pretrained small Llama: its cache folder, pretrained there first if missing."""
    qs = quickstart.parse_args([])  # the quickstart's own defaults: same recipe, same cache
    path = quickstart.cache_path(qs)
    if not (path / "config.json").exists():
        print(f"pretraining the quickstart's small Llama ({qs.pretrain_steps} steps, once); cached in {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        quickstart.pretrain(qs, path)
    return str(path)


def load_base(path: str):
    from transformers import AutoModelForCausalLM

    # float32 on CPU (bf16 matmuls are slow there); on a GPU the checkpoint's own dtype
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto" if torch.cuda.is_available() else torch.float32)


def load_model(args):
    """(base model, tokenizer); sets args.model_path, which the reload needs."""
    from transformers import AutoTokenizer

    args.model_path = args.model or embedded_model()
    return load_base(args.model_path), AutoTokenizer.from_pretrained(args.model_path)


def load_data(args):
    """(train, eval) datasets; the eval split is the dataset's own, or held out from train."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if args.dataset is None:
        train, evals = quickstart.docs_task(args.seed, N_EVAL)
        return Dataset.from_dict({"text": train}), Dataset.from_dict({"text": evals})
    path = Path(args.dataset)
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise SystemExit(f"--dataset {path}: a local file must be one of {sorted(LOCAL_FORMATS)}")
        data = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path))
    elif (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        data = load_from_disk(str(path))  # a folder written by save_to_disk
    else:
        data = load_dataset(args.dataset)  # a Hub id, or a folder of data files
    if not isinstance(data, DatasetDict):
        data = DatasetDict(train=data)
    held_out = next((s for s in ("test", "validation") if s in data), None)
    if held_out:
        return data["train"], data[held_out].select(range(min(N_EVAL, len(data[held_out]))))
    split = data["train"].train_test_split(test_size=min(N_EVAL, max(1, len(data["train"]) // 10)), seed=args.seed)
    return split["train"], split["test"]


def sft_config(args):
    from trl import SFTConfig

    gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, logging_steps=10, report_to="none",
        lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 10),  # the quickstart's schedule
        use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported(),  # TRL asks for bf16 unless told
        gradient_checkpointing=args.model is not None,  # saves memory on a real model; the embedded one needs none
        # one save at the end; with checkpoints, SparseCallback saves its schedule's state beside each one
        save_strategy="no",
        push_to_hub=bool(args.push_to_hub), hub_model_id=args.push_to_hub,
    )


@torch.no_grad()
def eval_loss(model, trainer) -> float:
    """Mean next-token loss over the eval set's labelled tokens, tokenized exactly as for training."""
    was_training = model.training
    model.eval()
    total = tokens = 0
    for batch in trainer.get_eval_dataloader():
        inputs = {k: v.to(model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        n = int((inputs["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        total += model(**inputs).loss.item() * n
        tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


def save_and_reload(args, trainer, before: float):
    """Save (and push) the adapter, load it again onto a fresh base, print the eval loss before and after.

    Returns the reloaded PeftModel: what a user of the adapter gets, measured instead of the trainer's copy.
    """
    from peft import PeftModel

    if args.push_to_hub:
        trainer.push_to_hub()  # saves to output_dir first, then uploads it with a model card
        print(f"adapter pushed to https://huggingface.co/{trainer.hub_model_id}")
    else:
        trainer.save_model(args.output_dir)
    if trainer.is_deepspeed_enabled:
        # training is over: load the check's base whole, not partitioned by ZeRO-3 as the trainer's was
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    reloaded = PeftModel.from_pretrained(load_base(args.model_path), args.output_dir).to(trainer.model.device)
    after = eval_loss(reloaded, trainer)
    print(f"{args.method}: eval loss {before:.3f} before -> {after:.3f} after {args.max_steps} steps "
          f"(adapter reloaded from {args.output_dir})")
    return reloaded
