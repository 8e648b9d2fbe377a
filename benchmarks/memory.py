"""Memory and speed of sparse_peft layers next to full fine-tuning and PEFT LoRA, on one small Llama.

For every setup, on the same randomly initialised model and the same batch, it measures the bytes
autograd saves for backward in one forward pass of the loss (distinct storages; weights and buffers
are left out, they are held anyway), the bytes of weights, gradients and AdamW state after the
optimizer has stepped, and the median time of a training step (forward, backward, AdamW step).
The "floor" setup trains nothing but still backpropagates into the input embeddings: what any
method pays to send a gradient through the frozen network.

    python benchmarks/memory.py                   # CPU, writes docs/benchmarks.md
    python benchmarks/memory.py --device cuda --hidden 1024 --layers 8 --no-write
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import sparse_peft  # noqa: F401  (registers SparseConfig with PEFT)
from sparse_peft import SparseConfig, SparseScheduler
from sparse_peft.measure import saved_tensors


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = [
    "floor", "full FT", "PEFT LoRA", "sparse unstructured", "sparse rows", "sparse columns", "sparse low-rank",
    "sparse SpIEL-AG", "sparse SpIEL-MA", "sparse S²FT",
    # the same with gradient checkpointing (each compared with the checkpointed LoRA and floor)
    "floor (GC)", "PEFT LoRA (GC)", "sparse S²FT (GC)",
]
MiB = 2**20


def saved_bytes(fn, module: torch.nn.Module) -> int:
    """Bytes that autograd keeps for backward while running fn(), the module's own tensors left out."""
    with saved_tensors(module) as saved:
        fn()
    return saved.bytes


def build_base(args) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),  # 256 -> 688, Llama's ratio of 11008 / 4096
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,  # grouped-query attention: k_proj and v_proj are narrower than q_proj
        vocab_size=1000,
        max_position_embeddings=args.seq,
        use_cache=False,  # as in training: no key/value cache outlives the forward
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def make_model(name: str, base: LlamaForCausalLM) -> torch.nn.Module:
    model = copy.deepcopy(base)  # every setup starts from the same weights
    if name.endswith(" (GC)"):
        name = name.removesuffix(" (GC)")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(name == "full FT")
    sparse = dict(target_modules=TARGETS, init_weights=True)
    if name == "PEFT LoRA":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    elif name == "sparse low-rank":
        model = get_peft_model(model, SparseConfig(structure="none", r=8, **sparse))
    elif name == "sparse S²FT":
        # heads of o_proj and channels of down_proj only, with as many trainable parameters as the LoRA
        lora_count = sum(8 * (m.in_features + m.out_features) for n, m in model.named_modules() if n.split(".")[-1] in TARGETS)
        model = get_peft_model(model, SparseConfig(method="s2ft", num_trainable=lora_count, init_weights=True))
    elif "SpIEL" in name:
        regrowth = "gradient" if "AG" in name else "momentum"
        spiel = dict(regrowth=regrowth)
        if "default schedule" not in name:
            # a short cycle, so that a few timed steps include regrowth windows and reselections
            spiel.update(reselection_steps=3, accumulation_steps=2)
        model = get_peft_model(model, SparseConfig(method="spiel", equivalent_rank=8, **spiel, **sparse))
    elif name.startswith("sparse"):
        structure = name.split()[1]
        model = get_peft_model(model, SparseConfig(structure=structure, equivalent_rank=8, **sparse))
    # Every setup backpropagates into the embedding output (as gradient checkpointing also makes it
    # do), so that "saved minus floor" is exactly what the method itself keeps.
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())
    return model.train()


class Setup:
    """One model, its optimizer and its training step."""

    def __init__(self, name: str, base, batch, device: str):
        self.name, self.batch, self.device = name, batch, device
        self.model = make_model(name, base).to(device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-4) if self.trainable else None
        self.scheduler = SparseScheduler(self.model, self.opt, total_steps=1000) if "SpIEL" in name else None
        self.schedule_bytes = 0  # the most the regrowth statistics held at once

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.batch, labels=self.batch).loss

    def step(self) -> float:
        """Seconds for forward, backward and the optimizer step."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.loss().backward()
        if self.opt is not None:
            self.opt.step()
            if self.scheduler is not None:
                self.scheduler.step()
                self.schedule_bytes = max(self.schedule_bytes, sum(t.nbytes for t in self.scheduler.state_dict().values()))
            self.opt.zero_grad(set_to_none=False)  # keep the gradient buffers, as a training loop does
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def row(self, saved: int, times: list[float]) -> dict:
        states = self.opt.state.values() if self.opt else []
        return dict(
            setup=self.name,
            trainable=sum(p.numel() for p in self.trainable),
            saved=saved,
            weights=sum(t.nbytes for t in (*self.model.parameters(), *self.model.buffers())),
            grads=sum(p.grad.nbytes for p in self.trainable if p.grad is not None),
            adamw=sum(t.nbytes for state in states for t in state.values() if torch.is_tensor(t)),
            schedule=self.schedule_bytes,
            step_s=statistics.median(times),
            mean_s=statistics.mean(times),
        )


def run_group(names: list[str], base, batch, args) -> tuple[list[dict], list[Setup]]:
    """Measures the setups of a group. They take turns step by step, so that a burst of load from
    another process on a shared machine slows all of them alike rather than one of them."""
    setups = [Setup(name, base, batch, args.device) for name in names]
    saved = [saved_bytes(s.loss, s.model) for s in setups]
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = [[] for _ in setups]
    for i in range(2 + args.steps):  # the first 2 rounds are warm-up
        for s, t in zip(setups, times):
            elapsed = s.step()
            t.extend([elapsed] if i >= 2 else [])
    rows = [s.row(b, t) for s, b, t in zip(setups, saved, times)]
    if args.device.startswith("cuda"):  # a group is one setup on CUDA, so the peak is its own
        rows[0].update(peak=torch.cuda.max_memory_allocated(), tok_s=batch.numel() / rows[0]["step_s"])
    return rows, setups


def layer_check(models: dict, args) -> list[tuple[str, int]]:
    """Bytes that one down_proj keeps for backward on its own, next to those of x and x[:, cols]."""
    col = models["sparse columns"].base_model.model.model.layers[0].mlp.down_proj
    lora = models["PEFT LoRA"].base_model.model.model.layers[0].mlp.down_proj
    cols = col.sparse_col_index["default"].long()
    x = torch.randn(args.batch, args.seq, col.in_features, requires_grad=True)
    return [
        (f"full input x {tuple(x.shape)}", x.nbytes),
        (f"x[:, cols] ({cols.numel()} of {col.in_features} columns)", x[..., cols].nbytes),
        ("saved by the frozen nn.Linear alone", saved_bytes(lambda: col.get_base_layer()(x), col)),
        ("saved by sparse columns (ColumnLinear)", saved_bytes(lambda: col(x), col)),
        ("saved by PEFT LoRA r=8", saved_bytes(lambda: lora(x), lora)),
    ]


def markdown(head: list[str], body: list[list[str]]) -> str:
    lines = [head, ["---"] * len(head), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def tables(rows: list[dict], cuda: bool) -> tuple[str, str]:
    """The main table, and each sparse setup's numbers divided by PEFT LoRA's (checkpointed rows by
    the checkpointed LoRA's, and their floor is the checkpointed floor)."""
    mode = lambda r: " (GC)" if r["setup"].endswith(" (GC)") else ""  # noqa: E731
    by_name = {r["setup"]: r for r in rows}
    floor = lambda r: by_name["floor" + mode(r)]["saved"]  # noqa: E731
    metrics = {  # name: (value of a row, how to print it)
        "trainable params": (lambda r: r["trainable"], "{:,}"),
        "saved for backward (MiB)": (lambda r: r["saved"] / MiB, "{:.2f}"),
        "added over floor (MiB)": (lambda r: (r["saved"] - floor(r)) / MiB, "{:.2f}"),
        "weights (MiB)": (lambda r: r["weights"] / MiB, "{:.2f}"),
        "grads (MiB)": (lambda r: r["grads"] / MiB, "{:.2f}"),
        "AdamW state (MiB)": (lambda r: r["adamw"] / MiB, "{:.2f}"),
        "regrowth state (MiB)": (lambda r: r["schedule"] / MiB, "{:.2f}"),
        "total (MiB)": (lambda r: (r["saved"] + r["weights"] + r["grads"] + r["adamw"] + r["schedule"]) / MiB, "{:.2f}"),
        "step (ms)": (lambda r: r["step_s"] * 1e3, "{:.1f}"),
    }
    if cuda:
        metrics["peak CUDA (MiB)"] = (lambda r: r["peak"] / MiB, "{:.1f}")
        metrics["tokens/s"] = (lambda r: r["tok_s"], "{:,.0f}")
    cells = lambda r: [fmt.format(f(r)) for f, fmt in metrics.values()]  # noqa: E731
    main = markdown(["setup", *metrics], [[r["setup"], *cells(r)] for r in rows])

    def ratio(f, r):
        lora = by_name["PEFT LoRA" + mode(r)]
        return f"{f(r) / f(lora):.2f}" if f(lora) else "n/a"

    ratios = markdown(
        ["setup / PEFT LoRA", *(m.split(" (")[0] for m in metrics)],
        [[r["setup"]] + [ratio(f, r) for f, _ in metrics.values()] for r in rows if r["setup"].startswith("sparse")],
    )
    return main, ratios


def machine(device: str) -> str:
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    cpu = f"{names[0]} ({len(names)} logical cores)" if names else "unknown CPU"
    gpu = f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""
    return f"{cpu}, torch {torch.__version__}, torch threads: {torch.get_num_threads()}, device `{device}`{gpu}"


def switch_table(base, args) -> str:
    """Serving many adapters on one base: the time to fold an adapter into the weights and take it out
    again (merge_adapter + unmerge_adapter), at the same trainable count."""
    rows = []
    for name in ("PEFT LoRA", "sparse unstructured", "sparse S²FT"):
        model = make_model(name, base).eval()
        times = []
        for i in range(7):  # 2 warm-up rounds
            start = time.perf_counter()
            model.merge_adapter()
            model.unmerge_adapter()
            times.append(time.perf_counter() - start)
        rows.append((name, statistics.median(times[2:])))
        del model
        gc.collect()
    lora = rows[0][1]
    return markdown(["setup", "merge + unmerge (ms)", "/ PEFT LoRA"], [[n, f"{t * 1e3:.2f}", f"{t / lora:.2f}"] for n, t in rows])


def report(rows, check, args, shape, cycle_table: str, switch: str) -> str:
    main, ratios = tables(rows, args.device.startswith("cuda"))
    check_table = markdown(["down_proj of layer 0", "MiB"], [[name, f"{b / MiB:.3f}"] for name, b in check])
    return f"""# Benchmarks: memory and speed

Generated by `benchmarks/memory.py`; do not edit by hand.

- Command: `{" ".join(["python benchmarks/memory.py", *sys.argv[1:]])}`
- Machine: {machine(args.device)}
- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Model: random-init Llama ({shape}), fp32, SDPA attention; batch {args.batch} × {args.seq} tokens
- Adapters on {", ".join(TARGETS)}: PEFT LoRA r=8 (dropout 0); sparse with `equivalent_rank=8`, the
  same r·(in + out) trainable entries per layer as LoRA; sparse low-rank is `structure="none", r=8`.

{main}

Each sparse setup divided by PEFT LoRA:

{ratios}

## How to read it

*Saved for backward* is every tensor autograd keeps from one forward pass of the loss, each storage
counted once, weights and buffers left out (they are in memory anyway). The *floor* trains nothing
but still backpropagates into the embedding output, as every setup here does: it is the activation
memory of sending a gradient through the frozen network. *Added over floor* is what each method
itself keeps. LoRA and the sparse layers should add about one copy of each targeted layer's input
(q/k/v share one input, as do gate/up, and o_proj's input is a view of the attention output that
SDPA keeps anyway); LoRA also keeps its rank-r hidden `x Aᵀ`, which our low-rank op recomputes.
The column form keeps only `x[:, cols]`, the columns it trains, so it adds a fraction of the
others. *Weights* include the frozen base and the adapters' index buffers; *grads* and *AdamW
state* cover what trains; *total* adds up every column in MiB, the memory a training step holds at its
peak on top of transient buffers. The byte counts are exact and do not depend on the load of the machine.
Step time (forward, backward, AdamW) is the median of {args.steps} steps after 2 warm-up steps, the
setups taking turns; on a CPU it reflects CPU kernels, not what a GPU would show. The unstructured
form multiplies by dense row blocks of Δ and dW built on the fly (more FLOPs than LoRA, but GEMMs),
which is where its extra time goes.

The SpIEL rows are the unstructured form with its drop-and-regrow schedule running on a short cycle
(regrow every 3 steps from 2 steps of statistics), so the timed steps include statistics windows
and reselections. *Regrowth state* is the most the schedule held at once: for gradient regrowth
(AG) a candidate position (int64) and a gradient sum (fp32) per trainable entry during a window;
for momentum regrowth (MA) one fp32 accumulator per row and per column of each weight.

## Per-layer check: the column form

The down_proj of layer 0 alone, run on a random input that requires grad:

{check_table}

## SpIEL over whole cycles of its default schedule

Regrowth every 20 steps from 5 steps of statistics (the paper's and our defaults), mean step time
over {args.cycle_steps} steps after 2 warm-up steps, setups taking turns. This includes two statistics
windows and two reselections; the medians in the first table, on a 3-step cycle, see mostly window
steps and so overstate the average cost.

{cycle_table}

## Switching adapters in place

Folding an adapter into the base weights and taking it out again (`merge_adapter()` then
`unmerge_adapter()`), median of 5 after 2 warm-up rounds: what serving many adapters on one base
by in-place switching costs. LoRA builds a dense B·A per layer; the sparse adapters scatter their
values (`index_put_` / `index_add_`) and build nothing dense.

{switch}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps, after 2 warm-up steps")
    p.add_argument("--cycle-steps", type=int, default=40, help="timed steps of the SpIEL default-schedule table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--output", default="docs/benchmarks.md", help="where to write the Markdown page")
    p.add_argument("--no-write", action="store_true", help="print the page only")
    args = p.parse_args()
    if args.threads:
        # One thread by default: on a shared or small machine, a busy core stalls every parallel
        # kernel at its barrier, and step times swing by 10x; one thread keeps them comparable.
        torch.set_num_threads(args.threads)

    base = build_base(args)
    c = base.config
    shape = (f"hidden {c.hidden_size}, intermediate {c.intermediate_size}, {c.num_hidden_layers} layers, "
             f"{c.num_attention_heads} heads, {c.num_key_value_heads} kv heads, vocab {c.vocab_size}")
    batch = torch.randint(0, c.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(args.device)

    # On a CPU all setups are built at once and timed in turns; on CUDA one at a time, so that each
    # peak of allocated memory belongs to one setup.
    groups = [[name] for name in SETUPS] if args.device.startswith("cuda") else [SETUPS]
    rows, kept = [], {}
    for names in groups:
        group_rows, setups = run_group(names, base, batch, args)
        rows += group_rows
        # the per-layer check runs on the CPU: it counts bytes and should not hold device memory
        kept.update({s.name: s.model.cpu() for s in setups if s.name in ("PEFT LoRA", "sparse columns")})
        del setups
        gc.collect()  # PEFT models hold reference cycles: free this group's memory before the next

    # SpIEL's cost averaged over whole cycles of its default schedule (regrow every 20 steps from 5
    # steps of statistics), where the medians above, on a 3-step cycle, see mostly window steps
    cycle_args = argparse.Namespace(**{**vars(args), "steps": args.cycle_steps})
    cycle_names = ["PEFT LoRA", "sparse SpIEL-AG default schedule", "sparse SpIEL-MA default schedule"]
    cycle_rows, setups = run_group(cycle_names, base, batch, cycle_args)
    del setups
    lora_mean = cycle_rows[0]["mean_s"]
    cycle_table = markdown(
        ["setup", "mean step (ms)", "/ PEFT LoRA"],
        [[r["setup"], f"{r['mean_s'] * 1e3:.1f}", f"{r['mean_s'] / lora_mean:.2f}"] for r in cycle_rows],
    )

    text = report(rows, layer_check(kept, args), args, shape, cycle_table, switch_table(base, args))
    print(text)
    if not args.no_write:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
