"""Quickstart: pretrain a tiny Llama offline, fine-tune it with a sparse adapter and with LoRA, compare.

    python -m sparse_peft.quickstart            # 2-4 minutes on 2 CPU cores, one of them busy or not
    python -m sparse_peft.quickstart --quick    # every stage in seconds: a smoke test, its losses mean nothing

Nothing is downloaded. The base model is a small Llama pretrained here on the Python standard
library's own source (text every machine has) and cached, so a second run skips that. It is then
fine-tuned on text of another kind: the English paragraphs of Python's reference manual (the
stdlib's `pydoc_data`), with whole topics held out for eval. Both adapters get the same base,
data, steps and seed, and the same number of trainable parameters (`methods.lora_budget`).
`--model` / `--dataset` swap in any causal LM and any dataset with a "text" column (Hub or local).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F


MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=344, max_position_embeddings=256)
SEQ_LEN, PRETRAIN_BATCH, PRETRAIN_LR = 128, 16, 3e-3
BATCH, FT_LEN, RANK = 16, 64, 8  # fine-tuning: examples are cut to FT_LEN tokens, to keep CPU steps short
# From a sweep on the default run (200 steps; eval loss 2.30 before fine-tuning), eval loss after:
#   LoRA   1e-3: 2.08   5e-3: 1.92   1e-2: 1.86   2e-2: 1.82   5e-2: 3.02 (diverged)
#   SpIEL  5e-3: 1.86   1e-2: 1.82   1.5e-2: 1.82   2e-2: 1.84   5e-2: 2.10   1e-1: 2.44
#   DSEE   1e-2: 1.75 (the default method since it beat LoRA's eval loss here; not swept)
# Runs this short favour large rates; each method gets its best. The sweep predates regrown entries taking
# the kept entries' mean Adam second moment; then, regrowth wanted a smaller rate than a fixed support
# (reselection_steps=0 was best at 5e-2: 1.77).
LR = {"lora": 2e-2, "sparse": 1e-2}
CACHE_FORMAT = 1  # bump when the pretraining recipe changes, so old caches are not reused


def parse_args(argv=None) -> argparse.Namespace:
    from .methods import DEFAULT_METHOD, METHODS

    p = argparse.ArgumentParser(prog="sparse-peft-quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="every stage in seconds (10 pretraining and 10 fine-tuning steps): a smoke test, not a comparison")
    p.add_argument("--steps", type=int, help="fine-tuning steps per method (default 200, --quick 10)")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps (default 400, --quick 10)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="sparse method to compare with LoRA")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on a machine with few or busy cores, "
                   "up to 4 where cores are idle; OMP_NUM_THREADS, if set, is kept)")
    p.add_argument("--output-dir", default="./sparse_peft_quickstart")
    p.add_argument("--cache-dir", help="where pretrained bases are cached (default $XDG_CACHE_HOME/sparse_peft)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="Hub id or local path of a causal LM: skips pretraining")
    p.add_argument("--dataset", help="Hub id or local path of a dataset with a 'text' column (default: the manual)")
    args = p.parse_args(argv)
    args.steps = (10 if args.quick else 200) if args.steps is None else args.steps
    args.pretrain_steps = (10 if args.quick else 400) if args.pretrain_steps is None else args.pretrain_steps
    if args.steps < 1 or args.pretrain_steps < 1:
        p.error("--steps and --pretrain-steps must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    args.n_eval = 32 if args.quick else 200
    return args


def cpu_threads(requested=None) -> tuple[int, str]:
    """How many threads torch gets on the CPU, and why.

    The models here are tiny: a second thread saves little, and one that must wait for a core another
    process holds stalls every small matmul at its barrier (two threads on a 2-core machine with one
    core busy took this quickstart 37 minutes, one thread a few). So one thread, unless the machine
    has idle cores to spare."""
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = int(cores - load)
    threads = 1 if cores <= 2 else max(1, min(4, idle - 1))  # an idle core kept spare for whatever else starts
    return threads, f"{cores} cores, load {load:.1f}; --threads to change"


# -- the base model ------------------------------------------------------------------------------
def byte_tokenizer():
    # ByT5's tokenizer is byte-level with no vocabulary file, so it needs no download, and unlike a
    # home-made one it saves with the model: `--model <cache dir>` then works like any checkpoint.
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def stdlib_tokens(tokenizer) -> torch.Tensor:
    """The top-level stdlib *.py files, sorted (deterministic for a Python version), as one token stream."""
    offset = tokenizer.encode("\x00", add_special_tokens=False)[0]  # ByT5: id = byte + 3 specials
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = b"".join(f.read_bytes() + b"\n" for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + offset


def cache_path(args) -> Path:
    root = Path(args.cache_dir) if args.cache_dir else (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse_peft")
    # Everything the weights depend on goes into the name: the stdlib differs between Python versions.
    settings = dict(model=MODEL, steps=args.pretrain_steps, seq=SEQ_LEN, batch=PRETRAIN_BATCH, lr=PRETRAIN_LR,
                    seed=args.seed, python=sys.version_info[:2], format=CACHE_FORMAT)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"quickstart-{digest}"


def warmup_cosine(optimizer, steps: int):
    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def pretrain(args, path: Path) -> None:
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    tokens = stdlib_tokens(tokenizer)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **MODEL)
    model = LlamaForCausalLM(config).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.1)
    sched = warmup_cosine(opt, args.pretrain_steps)
    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.pretrain_steps), desc=f"pretrain on {len(tokens) / 1e6:.1f}M bytes of stdlib")
    for _ in bar:
        # random windows of the stream: cheaper than epochs over chunks, and as good for a few steps
        starts = torch.randint(len(tokens) - SEQ_LEN, (PRETRAIN_BATCH,), generator=g)
        ids = torch.stack([tokens[s:s + SEQ_LEN] for s in starts.tolist()]).to(args.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    # Write to a temporary folder and rename: an interrupted run must not leave a half-written cache.
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process cached it meanwhile: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_base(path, device):
    from transformers import AutoModelForCausalLM

    # float32: the adapters train in float32 anyway, and the small models here gain nothing from less
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


# -- the fine-tuning data ------------------------------------------------------------------------
def docs_task(seed: int, n_eval=200):
    """Paragraphs of Python's reference manual, which the stdlib ships as `pydoc_data`.

    English prose about Python, where pretraining saw Python code: a shift the adapters must learn.
    The manual is not among the pretraining files (top-level *.py only). Whole topics are held out
    for eval, so no eval paragraph has a neighbour in training.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    held_out = set(random.Random(seed).sample(names, k=len(names) // 8))
    split = {True: [], False: []}
    for name in names:  # paragraphs; the shortest are mostly "*****" underlines and grammar fragments
        split[name in held_out] += [p.strip() for p in topics[name].split("\n\n") if len(p.strip()) >= 40]
    random.Random(seed).shuffle(split[True])
    return split[False], split[True][:n_eval]


def text_dataset(path: str, seed: int, n_eval=200):
    """Train and eval texts from a dataset's "text" column; an eval split is held out if it has none."""
    import datasets

    local = Path(path)
    if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
        ds = datasets.load_from_disk(path)  # a folder written by save_to_disk
    elif local.is_dir() and any(local.rglob("*.txt")):
        ds = datasets.load_dataset("text", data_dir=path)
    elif local.is_file() and local.suffix == ".txt":
        ds = datasets.load_dataset("text", data_files=path)
    else:
        ds = datasets.load_dataset(path)  # Hub id, or a local folder of json/csv/parquet
    if isinstance(ds, datasets.DatasetDict):
        held_out = next((s for s in ("validation", "test") if s in ds), None)
        train = ds["train"] if "train" in ds else ds[next(iter(ds))]
        evals = ds[held_out] if held_out else None
    else:
        train, evals = ds, None
    if "text" not in train.column_names:
        raise ValueError(f"dataset {path!r} has no 'text' column (columns: {train.column_names})")
    texts = [t for t in train["text"] if t and t.strip()]
    if evals is None:
        random.Random(seed).shuffle(texts)
        n_eval = min(n_eval, max(1, len(texts) // 10))
        texts, eval_texts = texts[n_eval:], texts[:n_eval]
    else:
        eval_texts = [t for t in evals["text"] if t and t.strip()][:n_eval]
    if not texts or not eval_texts:
        raise ValueError(f"dataset {path!r} has too few non-empty texts for a train and an eval split")
    return texts, eval_texts


def encode(tokenizer, texts):
    """Token ids of each text, cut to FT_LEN; EOS at the end (when it fits) teaches where texts stop."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [(tokenizer.encode(t, add_special_tokens=False) + eos)[:FT_LEN] for t in texts]


def collate(examples, pad_id: int, device):
    input_ids = torch.full((len(examples), max(map(len, examples))), pad_id)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(examples):
        input_ids[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), 1
    return dict(input_ids=input_ids.to(device), attention_mask=mask.to(device))


# -- fine-tuning and measuring -------------------------------------------------------------------
def loss_sum(model, batch):
    """Summed next-token loss over the real (non-padding) tokens, and their count: eval means weigh tokens."""
    logits = model(**batch).logits[:, :-1]
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    total, count = zip(*(loss_sum(model, b) for b in batches))
    model.train()
    return float(sum(total)) / sum(count)


def finetune(label, peft_config, lr, base_path, train, eval_batches, pad_id, args):
    from peft import get_peft_model
    from tqdm.auto import tqdm

    from . import SparseConfig, SparseScheduler
    from .memory import saved_tensors

    torch.manual_seed(args.seed)
    model = get_peft_model(load_base(base_path, args.device), peft_config)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = evaluate(model, eval_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, args.steps)
    # the method's schedule with the run's length (SpIEL's regrowth and SaRA's progressive step need it); it
    # runs by itself at every opt.step(), as it would in a Trainer
    sparse = SparseScheduler(model, opt, total_steps=args.steps) if isinstance(peft_config, SparseConfig) else None
    schedule_stats = set()
    g = torch.Generator().manual_seed(args.seed)  # same batches, in the same order, for every method
    losses, times = [], []
    saved = saved_tensors(model)
    for step in (bar := tqdm(range(args.steps), desc=f"{label} (lr {lr:g})")):
        batch = collate([train[i] for i in torch.randint(len(train), (BATCH,), generator=g).tolist()],
                        pad_id, args.device)
        start = time.perf_counter()
        # one step is measured: they are all alike
        with saved if step == 0 else contextlib.nullcontext():
            total, count = loss_sum(model, batch)
            loss = total / max(count, 1)
        loss.backward()
        opt.step()
        if sparse is not None:
            schedule_stats.update(sparse.last_stats)
        sched.step(), opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    row = dict(method=label, trainable=sum(p.numel() for p in params), before=before,
               after=evaluate(model, eval_batches), saved=saved.bytes,
               peak=torch.cuda.max_memory_allocated() if cuda else None, step_ms=1e3 * statistics.median(times),
               schedule=sorted(schedule_stats))
    return model, row, losses


def adapter_bytes(model, folder: Path) -> int:
    model.save_pretrained(folder)
    return (folder / "adapter_model.safetensors").stat().st_size


@torch.no_grad()
def check_reload(model, base_path, folder: Path, batch, device) -> None:
    """The saved adapter must give the trained model's logits exactly, and merged within 1e-4."""
    from peft import PeftModel

    model.eval()
    expected = model(**batch).logits
    reloaded = PeftModel.from_pretrained(load_base(base_path, device), folder).eval()
    if not torch.equal(reloaded(**batch).logits, expected):
        raise RuntimeError(f"the adapter reloaded from {folder} gives other logits than the trained model")
    print(f"reload from {folder}: logits identical -- OK")
    merged = reloaded.merge_and_unload()
    diff = (merged(**batch).logits - expected).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"merge_and_unload changed the logits by up to {diff:.2e} (> 1e-4)")
    print(f"merge_and_unload: max |logit difference| {diff:.1e} <= 1e-4 -- OK")


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        ema, smooth = losses[0], []
        for x in losses:  # exponential moving average: per-batch losses are noisy
            ema = 0.9 * ema + 0.1 * x
            smooth.append(ema)
        (line,) = ax.plot(losses, alpha=0.25)
        ax.plot(smooth, color=line.get_color(), label=label)
    ax.set(xlabel="step", ylabel="train loss", title="Fine-tuning: sparse vs LoRA, same data and steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows, device) -> None:
    memory = "peak CUDA MiB" if device == "cuda" else "saved-for-bwd MiB"
    columns = f"{'method':<20}{'trainable':>11}{'eval before':>13}{'eval after':>12}{memory:>19}{'step ms':>9}"
    print(f"\n{columns}{'adapter bytes':>15}\n" + "-" * (len(columns) + 15))
    for r in rows:
        mem = (r["peak"] if device == "cuda" else r["saved"]) / 2**20
        print(f"{r['method']:<20}{r['trainable']:>11,}{r['before']:>13.3f}{r['after']:>12.3f}{mem:>19.2f}"
              f"{r['step_ms']:>9.1f}{r['adapter']:>15,}")
    if device != "cuda":
        print("saved-for-bwd: what autograd keeps for backward in one step, weights and index buffers excluded (CPU has no peak)")


def main(argv=None) -> int:
    args = parse_args(argv)
    previous = torch.get_num_threads()
    threads, why = cpu_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"torch CPU threads: {threads} ({why})")
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous)  # main() may run inside another program (the tests)


def run(args) -> int:
    import peft
    from transformers import AutoTokenizer

    from . import SparseConfig  # importing the package registers the sparse method with PEFT
    from .methods import lora_budget

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        base_path, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)
    else:
        base_path = cache_path(args)
        if (base_path / "config.json").exists():
            print(f"using the cached pretrained base in {base_path}")
        else:
            print(f"pretraining a small Llama ({args.pretrain_steps} steps); it will be cached in {base_path}")
            base_path.parent.mkdir(parents=True, exist_ok=True)
            pretrain(args, base_path)
        tokenizer = byte_tokenizer()
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    texts = text_dataset(args.dataset, args.seed, args.n_eval) if args.dataset else docs_task(args.seed, args.n_eval)
    train, evals = (encode(tokenizer, t) for t in texts)
    eval_batches = [collate(evals[i:i + BATCH], pad_id, args.device) for i in range(0, len(evals), BATCH)]
    print(f"fine-tuning data: {len(train)} train and {len(evals)} eval texts of up to {FT_LEN} tokens")

    # task_type makes the saved adapters loadable with AutoPeftModelForCausalLM too
    common = dict(target_modules="all-linear", task_type="CAUSAL_LM")
    sparse = SparseConfig(method=args.method, **lora_budget(args.method, RANK), **common)
    lora = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, **common)
    runs = [(f"sparse ({args.method})", sparse, LR["sparse"], out), ("lora", lora, LR["lora"], out / "lora")]
    rows, curves = [], {}
    for label, config, lr, folder in runs:
        model, row, curves[label] = finetune(label, config, lr, base_path, train, eval_batches, pad_id, args)
        print(f"{label}: {row['trainable']:,} trainable, eval loss {row['before']:.3f} -> {row['after']:.3f}")
        if row["schedule"]:  # what the method's own steps reported: its whole recipe ran
            print(f"{label}: schedule ran, reporting {', '.join(row['schedule'])}")
        row["adapter"] = adapter_bytes(model, folder)  # the sparse adapter is the output; LoRA's is kept aside
        if folder == out:
            check_reload(model, base_path, out, eval_batches[0], args.device)
        rows.append(row)
        del model  # free it (cycles and all) before the next run, whose peak memory is measured
        gc.collect()
    print_table(rows, args.device)
    if rows[0]["trainable"] != rows[1]["trainable"]:  # e.g. dsee and sltrain add a rank-r part of their own
        print(f"note: {rows[0]['method']} trains {rows[0]['trainable']:,} parameters, LoRA {rows[1]['trainable']:,}")
    if rows[0]["after"] >= rows[0]["before"]:
        print(f"note: the eval loss of {rows[0]['method']} did not go down; try more --steps")
    plot(curves, out / "loss_curves.png")
    print(f"sparse adapter: {out}; loss curves: {out / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
