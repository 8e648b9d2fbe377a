"""SLTrain pretraining: a small Llama trained from scratch three ways, at the same size, data, steps and seed.

    full-rank   every block linear a dense W (the usual model)
    low-rank    W = B·A only, its rank raised so that it has as many parameters as SLTrain
    sltrain     W = (α/r)·B·A + S, S at a fixed random 3 % of the positions (sparse_peft.pretraining.convert)

    OMP_NUM_THREADS=1 python examples/sltrain/pretrain.py --plot   # PRETRAINING.md's table, ~11 min on one CPU core
    python examples/sltrain/pretrain.py --quick                     # a tiny model for a few steps: a smoke test
    python examples/sltrain/pretrain.py --device cuda --steps 2000 --plot

Prints validation perplexity (per byte), parameters and training memory per model. Paper (Han et al.
2024, Table 2, LLaMA 60M): full-rank 34.06, SLTrain ~34.15, low-rank 78.18. The data is the Python
standard library's own source (as the quickstart's); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from sparse_peft import ops, pretraining
from sparse_peft.memory import saved_tensors
from sparse_peft.quickstart import byte_tokenizer, stdlib_tokens, warmup_cosine


# The paper's LLaMA-60M (hidden 512, 8 layers, r = 128), shrunk for 2 CPU cores; r = hidden / 4 as there
MODEL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4)
QUICK_MODEL = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2)
RANK, DENSITY, ALPHA = 32, 0.03, 32.0  # the paper's 60M setting: δ = 0.03, α = 32 (r scaled with the width)
QUICK_RANK = 16
# SLTrain: the paper's 3e-3. The baselines: the best of a small sweep on the default run (PRETRAINING.md),
# full-rank 1e-3 / 2e-3 / 3e-3 / 6e-3, low-rank 1e-3 / 3e-3 / 1e-2.
LR = {"full-rank": 2e-3, "low-rank": 3e-3, "sltrain": 3e-3}
VAL_SHARE = 0.05  # the last 5 % of the stream (the last stdlib files, uuid.py on) is never trained on


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="optimizer steps per model (default 600, --quick 8)")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: seconds")
    p.add_argument("--out", default="out/sltrain-pretrain",
                   help="folder for the SLTrain model, results and plot (default %(default)s; out/ is git-ignored)")
    p.add_argument("--plot", action="store_true", help="write val_curves.png, the three validation curves")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, help="sequences per step (default 16, --quick 4)")
    p.add_argument("--seq", type=int, help="bytes per sequence (default 128, --quick 32)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (8 if quick else 600)
    args.batch = args.batch or (4 if quick else 16)
    args.seq = args.seq or (32 if quick else 128)
    args.n_val = 8 if quick else 128  # validation windows of `seq` bytes, fixed
    args.eval_every = max(1, args.steps // (2 if quick else 10))
    args.model, args.rank = (QUICK_MODEL, QUICK_RANK) if quick else (MODEL, RANK)
    return args


# -- the low-rank-only baseline --------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """W = B·A and nothing else: the paper's "Low-rank" baseline (a factorised layer trained from scratch)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        # Both factors random, as two stacked nn.Linear: with B = 0 (SLTrain's init) every block would
        # start at exactly zero, since here there is no S to carry the signal.
        nn.init.uniform_(self.A, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
        nn.init.uniform_(self.B, -1 / math.sqrt(rank), 1 / math.sqrt(rank))

    def forward(self, x):
        # the same autograd op as SLTrain's low-rank part (saves x only), so the memory columns compare like with like
        return ops.low_rank_linear(x, self.A, self.B, 1.0)


def block_linears(model):
    """(name, nn.Linear) of the transformer blocks: what pretraining.convert replaces by default."""
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m is not model.lm_head]


def to_low_rank(model, budgets: dict) -> list:
    """Replace each block linear by LowRankLinear with `budgets[name]` parameters, as near as a whole rank allows."""
    ranks, carry = [], 0.0  # the rounding error is carried to the next layer, so the total stays matched
    for name, old in block_linears(model):
        per_rank = old.in_features + old.out_features
        rank = max(1, round((budgets[name] + carry) / per_rank))
        carry += budgets[name] - rank * per_rank
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LowRankLinear(old.in_features, old.out_features, rank))
        ranks.append(rank)
    return ranks


def build(kind: str, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, max_position_embeddings=max(256, args.seq), **args.model)
    torch.manual_seed(args.seed)  # the same embeddings, norms and head for all three
    model = LlamaForCausalLM(config)
    ranks = []  # of the replaced linears; none for full-rank
    if kind == "sltrain":
        pretraining.convert(model, rank=args.rank, density=DENSITY, alpha=ALPHA, seed=args.seed)
        ranks = [args.rank]
    elif kind == "low-rank":
        # each layer gets the parameters SLTrain's layer of the same shape has, counted on an SLTrain model
        twin = pretraining.convert(LlamaForCausalLM(config), rank=args.rank, density=DENSITY, alpha=ALPHA, seed=args.seed)
        budgets = {n: sum(p.numel() for p in m.parameters())
                   for n, m in twin.named_modules() if isinstance(m, pretraining.SLTrainLinear)}
        torch.manual_seed(args.seed + 1)  # the factors' own draw
        ranks = to_low_rank(model, budgets)
    return model.to(args.device), ranks


# -- data ------------------------------------------------------------------------------------------
def data(args):
    """(train stream, validation windows): the quickstart's stdlib bytes, the tail held out."""
    tokens = stdlib_tokens(byte_tokenizer())
    split = int(len(tokens) * (1 - VAL_SHARE))
    val = tokens[split:split + args.n_val * args.seq].view(args.n_val, args.seq)
    return tokens[:split], val.to(args.device)


def batches(train, args):
    """Random windows of the stream, from a fixed generator: every model sees the same batches in the same order."""
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        starts = torch.randint(len(train) - args.seq, (args.batch,), generator=g).tolist()
        yield torch.stack([train[s:s + args.seq] for s in starts]).to(args.device)


@torch.no_grad()
def evaluate(model, val, batch: int = 16) -> float:
    """Mean next-byte loss over the validation windows (all of one length, so a mean of means is exact)."""
    model.eval()
    losses = [model(input_ids=w, labels=w).loss * len(w) for w in val.split(batch)]
    model.train()
    return float(sum(losses)) / len(val)


# -- training and measuring ------------------------------------------------------------------------
def state_bytes(model, opt) -> int:
    """Parameters + gradients + AdamW's two moments (+ buffers such as SLTrain's index arrays), as held now."""
    tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None)]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def train(kind: str, args, train_tokens, val) -> tuple:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
    model, ranks = build(kind, args)
    opt = torch.optim.AdamW(model.parameters(), lr=LR[kind], weight_decay=0.0)  # GaLore's recipe, as the paper's
    sched = warmup_cosine(opt, args.steps)  # 10 % warmup, then cosine
    curve, times, row = [(0, evaluate(model, val))], [], {}
    saved = saved_tensors(model)
    for step, ids in enumerate(batches(train_tokens, args), 1):
        start = time.perf_counter()
        # the first step is measured: they are all alike
        with saved if step == 1 else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == 1:  # gradients and both Adam moments exist now: the training state at its largest
            row["state"], row["saved"] = state_bytes(model, opt), saved.bytes
        sched.step(), opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val)))
            print(f"  {kind:<9} step {step:>5}  train {loss.item():.3f}  val {curve[-1][1]:.3f}", flush=True)
    linears = [m for m in model.model.layers.modules()
               if isinstance(m, (nn.Linear, LowRankLinear, pretraining.SLTrainLinear))]
    rank = "-" if not ranks else str(min(ranks)) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
    row.update(model=kind, rank=rank,
               params=sum(p.numel() for p in model.parameters()),
               linear_params=sum(p.numel() for m in linears for p in m.parameters()),
               val_loss=curve[-1][1], ppl=math.exp(curve[-1][1]), step_ms=1e3 * statistics.median(times),
               peak=torch.cuda.max_memory_allocated() if cuda else None, curve=curve)
    return model, row


def check_reload(model, val, out: Path, args) -> dict:
    """save_pretrained, pretraining.from_pretrained: the same eval loss, exactly; densified: the same within 1e-4."""
    expected = evaluate(model, val)
    model.save_pretrained(out), byte_tokenizer().save_pretrained(out)  # a complete checkpoint
    reloaded = pretraining.from_pretrained(str(out)).to(args.device)
    again = evaluate(reloaded, val)
    if again != expected:
        raise RuntimeError(f"the SLTrain model reloaded from {out} has eval loss {again!r}, trained {expected!r}")
    dense = evaluate(pretraining.densify(reloaded), val)
    if abs(dense - expected) > 1e-4:
        raise RuntimeError(f"the densified model has eval loss {dense!r}, the SLTrain model {expected!r}")
    print(f"reload from {out}: eval loss {again:.6f}, identical -- OK")
    print(f"densified (plain nn.Linear): eval loss {dense:.6f}, |difference| {abs(dense - expected):.1e} -- OK")
    return dict(eval_loss=expected, reloaded=again, densified=dense)


def print_table(rows, args) -> None:
    mib = 2**20
    head = (f"{'model':<10}{'rank':>7}{'params':>11}{'in linears':>12}{'val loss':>10}{'val ppl':>9}"
            f"{'state MiB':>11}{'saved MiB':>11}{'total MiB':>11}{'vs full':>9}{'step ms':>9}")
    head += f"{'peak CUDA MiB':>15}" if args.device == "cuda" else ""
    print("\n" + head + "\n" + "-" * len(head))
    full = rows[0]["state"] + rows[0]["saved"]
    for r in rows:
        total = r["state"] + r["saved"]
        line = (f"{r['model']:<10}{r['rank']:>7}{r['params']:>11,}{r['linear_params']:>12,}{r['val_loss']:>10.4f}"
                f"{r['ppl']:>9.3f}{r['state'] / mib:>11.1f}{r['saved'] / mib:>11.1f}{total / mib:>11.1f}"
                f"{total / full:>9.0%}{r['step_ms']:>9.0f}")
        print(line + (f"{r['peak'] / mib:>15.1f}" if r["peak"] is not None else ""))
    print("state: parameters + gradients + AdamW moments (+ index buffers), fp32; saved: what autograd keeps for "
          "backward in one step.\nval ppl: per byte, on held-out stdlib source; lower is better.")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        steps, losses = zip(*r["curve"])
        label = f"{r['model']} ({r['params'] / 1e6:.2f}M params)"
        ax.plot(steps, [math.exp(v) for v in losses], marker=".", label=label)
    ax.set(xlabel="step", ylabel="validation perplexity (per byte)", yscale="log",
           title="Pretraining from scratch: full-rank vs low-rank vs SLTrain")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokens, val = data(args)
    print(f"{len(train_tokens) / 1e6:.1f}M training bytes, {val.numel():,} validation bytes; "
          f"{args.steps} steps of {args.batch}x{args.seq} bytes; model {args.model}")
    rows = []
    for kind in ("full-rank", "low-rank", "sltrain"):
        model, row = train(kind, args, train_tokens, val)
        rows.append(row)
        if kind == "sltrain":
            reload = check_reload(model, val, out / "sltrain", args)
        del model
        gc.collect()  # free it before the next model, whose CUDA peak is measured
    print_table(rows, args)
    low, sl = rows[1]["linear_params"], rows[2]["linear_params"]
    print(f"parameters in the block linears: low-rank {low:,}, SLTrain {sl:,} ({low / sl - 1:+.2%})")
    full, low_ppl, sl_ppl = (r["ppl"] for r in rows)
    # the paper's ordering: low-rank only is the worst, and SLTrain is nearer full-rank than low-rank
    appears = low_ppl > max(full, sl_ppl) and abs(math.log(sl_ppl / full)) < math.log(low_ppl / sl_ppl)
    print(f"perplexity vs full-rank: SLTrain {sl_ppl / full - 1:+.1%}, low-rank {low_ppl / full - 1:+.1%} -> "
          f"the paper's ordering (full-rank ~ SLTrain < low-rank) {'appears' if appears else 'does NOT appear'}")
    print(f"SLTrain memory vs full-rank at the same model size: state {rows[2]['state'] / rows[0]['state']:.0%}, "
          f"state + saved {(rows[2]['state'] + rows[2]['saved']) / (rows[0]['state'] + rows[0]['saved']):.0%}")
    results = dict(args=vars(args), rows=rows, reload=reload, ordering_appears=appears, torch=torch.__version__)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(rows, out / "val_curves.png")
        print(f"validation curves: {out / 'val_curves.png'}")
    return results


if __name__ == "__main__":
    main()
