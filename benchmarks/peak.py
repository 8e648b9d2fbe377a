"""The true peak memory of one training step, every method against PEFT LoRA at its trainable count.

    python benchmarks/peak.py                 # CPU, about eight minutes; prints the tables (Markdown)
    python benchmarks/peak.py --no-wide       # the hidden-256 model only, well under a minute

`saved for backward` (benchmarks/run.py) counts what autograd keeps between forward and backward;
it leaves out every transient a step builds and drops: a scratch copy of a weight (the fused
one-GEMM path, GGPO's noisy weight), the dense weight-gradient blocks of the unstructured update,
SpIEL's gradient probe, SaRA's dense ΔW for its nuclear-norm penalty, the optimizer's temporaries.
This script measures all of it: `sparse_peft.memory.peak_memory` replays every allocation torch's
CPU allocator makes during a step (forward, backward, the method's schedule, AdamW step,
zero_grad(set_to_none=True)), and reports the most bytes held at once beyond what was there before
(frozen weights, adapter parameters, AdamW state). Byte counts, exact, independent of machine load.

Models: the benchmark's byte-level Llama (hidden 256, 4 layers; benchmarks/run.py) at 4 × 256 and
1 × 128 tokens per step, and a wide one (hidden 1024, intermediate 2752, 2 layers) at 1 × 128 and
4 × 256 tokens; random weights (memory does not depend on them), fp32. Adapters as in run.py:
each method's preset at PEFT LoRA r=8's trainable count on the seven projections (S²FT: LoRA's
total over the seven, on o_proj and down_proj). Steps 1-4 are the start: SpIEL's first gradient window
opens at step 1 (its probe forms the weight gradient of each layer, one block of rows at a time), and
RoSA's warm-up (benchmarks/run.py's 4 steps) pools gradient statistics until its mask is chosen;
steps 5-7 are the steady state (SaRA penalises the 2752-row gate and up projections there). AdamW's
state is created before step 1 (a zero-gradient step, which changes no weight), so that it counts as
existing memory, not as step 1's peak. The wide model has 2 layers, so
S²FT's whole heads, pooled over the layers, still round its count up (the trainable column shows it).

The *floor* row is the frozen model alone, backpropagating into the embedding output as every setup does:
its own activations and their gradients, which no method goes below (with SwiGLU's backward at 1 × 128
tokens it is 0.84x LoRA's step on the wide model).

Then one layer at a time, path by path: each path of sparse_peft/ops.py (gather aside), GGPO's
perturbed layer and a Conv2d, forward + backward at 128 tokens, what it saves for backward and its
true peak over the frozen layer's own (docs/memory.md tabulates what each path forms).
`--device cuda` reads the CUDA allocator's peak instead (not run for the published tables).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import os
import sys
from types import SimpleNamespace

# benchmarks/layer_timings.py would shadow the `kernels` package that transformers imports: keep this folder off the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from sparse_peft import METHODS, SparseScheduler  # noqa: E402
from sparse_peft.memory import peak_memory, saved_tensors  # noqa: E402


def _load_run():
    """benchmarks/run.py (the model, the budgets, the LoRA setup), loaded by path: the folder is off sys.path."""
    if "benchmarks_run" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "benchmarks_run", os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks_run"] = module
        spec.loader.exec_module(module)
    return sys.modules["benchmarks_run"]


run = _load_run()

MiB = 2**20
START = run.MASK_WARMUP  # steps 1-4: SpIEL's first window opens, RoSA's warm-up runs
STEPS = START + 3  # measured steps per setup: the start, then the steady state
TOTAL_STEPS = 30  # the schedule's run length, as run.py's (SpIEL's window is open at step 1)


def shapes(wide: bool) -> list[tuple[int, int, int, int]]:
    """(hidden, layers, batch, seq) of each measured configuration."""
    rows = [(256, 4, 4, 256), (256, 4, 1, 128)]
    if wide:
        rows += [(1024, 2, 1, 128), (1024, 2, 4, 256)]
    return rows


def setups() -> list[str]:
    return ["floor", "PEFT LoRA", *METHODS]


def build(name: str, base, budget, device: str = "cpu"):
    if name == "floor":  # the frozen model alone, backpropagating into the embedding output: no method goes lower
        model = copy.deepcopy(base).requires_grad_(False).to(device)
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())
        return model.train(), None, None, 0
    specs = {s.name: s for s in run.specs()}
    model = run.get_peft_model(copy.deepcopy(base), specs[name].config(budget)).to(device)
    # as in run.py: every setup backpropagates into the embedding output
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    scheduler = SparseScheduler(model, opt, total_steps=TOTAL_STEPS) if name in METHODS else None
    for p in trainable:  # create AdamW's state now: with zero gradients the step changes no weight
        p.grad = torch.zeros_like(p)
    opt.step()  # (no backward ran: SpIEL's gradient probe is still waiting for its first one)
    opt.zero_grad(set_to_none=True)
    return model, opt, scheduler, sum(p.numel() for p in trainable)


def step(model, opt, scheduler, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    if opt is None:
        return  # the floor: nothing trains
    if scheduler is not None:
        scheduler.before_optimizer_step()
    opt.step()
    if scheduler is not None:
        scheduler.step()
    opt.zero_grad(set_to_none=True)


def measure(hidden: int, layers: int, batch: int, seq: int, device: str = "cpu") -> list[dict]:
    args = SimpleNamespace(hidden=hidden, layers=layers, seq=seq)
    base = run.build_base(args)
    budget = run.target_budget(base)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (batch, seq), generator=g).to(device) for _ in range(STEPS)]
    rows = []
    for name in setups():
        model, opt, scheduler, trainable = build(name, base, budget, device)
        with saved_tensors(model) as saved:
            model(input_ids=batches[0], labels=batches[0]).loss
        peaks = []
        for ids in batches:
            with peak_memory(device) as peak:
                step(model, opt, scheduler, ids)
            peaks.append(peak.bytes)
        rows.append(dict(name=name, trainable=trainable, saved=saved.bytes, first=max(peaks[:START]),
                         steady=max(peaks[START:])))
        del model, opt, scheduler
        gc.collect()
    largest = max(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear)) * 4
    return [dict(r, shape=(hidden, layers, batch, seq), largest=largest) for r in rows]


def table(rows: list[dict]) -> str:
    hidden, layers, batch, seq = rows[0]["shape"]
    lora = next(r for r in rows if r["name"] == "PEFT LoRA")
    body = [[r["name"], f"{r['trainable']:,}", f"{r['saved'] / MiB:.2f}", f"{r['first'] / MiB:.2f}",
             f"{r['steady'] / MiB:.2f}", f"{r['saved'] / lora['saved']:.2f}", f"{r['first'] / lora['first']:.2f}",
             f"{r['steady'] / lora['steady']:.2f}"] for r in rows]
    largest = rows[0]["largest"] / MiB
    head = f"Hidden {hidden}, {layers} layers, {batch} × {seq} tokens (largest weight: {largest:.2f} MiB in fp32)"
    return head + ":\n\n" + run.markdown(
        ["setup", "trainable", "saved for backward (MiB)", f"peak, steps 1-{START} (MiB)",
         f"peak, steps {START + 1}-{STEPS} (MiB)", "saved / LoRA", f"peak steps 1-{START} / LoRA",
         f"peak steps {START + 1}-{STEPS} / LoRA"], body)


# -- one layer, path by path -----------------------------------------------------------------------
LAYER_SHAPES = ((2752, 1024), (4096, 4096))  # the wide model's MLP layer (one row block), a 7B-sized one (four)
LAYER_TOKENS = 128


def _layer_paths(out_f: int, in_f: int, n: int, device: str = "cpu"):
    """The paths of sparse_peft's ops on one fp32 layer, at LoRA r=8's trainable count unless a density is
    named: ([(name, forward)], x, dy, the tensors that exist anyway: weight, trainable tensors, indices)."""
    import torch.nn.functional as F

    from sparse_peft import ops
    from sparse_peft.perturbation import perturbed_linear

    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_(grad)

    def zeros(*shape):
        return torch.zeros(*shape, device=device, requires_grad=True)

    w = rand(out_f, in_f, scale=0.02)
    x = rand(n, in_f, grad=True)
    dy = rand(n, out_f)
    size, budget = out_f * in_f, 8 * (out_f + in_f)

    def support(k):
        return torch.randperm(size, generator=g)[:k].sort().values.int().to(device), zeros(k)

    idx, v = support(budget)
    idx_small, v_small = support(size // 1000)  # 0.1 %: below the threshold, the sparse kernels
    idx_half, v_half = support(budget // 2)
    layout, layout_half = ops.Layout(idx, in_f), ops.Layout(idx_half, in_f)  # what a layer keeps per support
    a, b = rand(8, in_f, scale=0.01, grad=True), zeros(out_f, 8)
    a4, b4 = rand(4, in_f, scale=0.01, grad=True), zeros(out_f, 4)
    rows, row_block = torch.arange(budget // in_f, device=device).int(), zeros(budget // in_f, in_f)
    cols, col_block = torch.arange(budget // out_f, device=device).int(), zeros(out_f, budget // out_f)
    std = torch.full((out_f,), 1e-3, device=device)
    lora_a = torch.nn.Linear(in_f, 8, bias=False, device=device)
    lora_b = torch.nn.Linear(8, out_f, bias=False, device=device)
    density = budget / size
    paths = [
        ("frozen base alone", lambda: F.linear(x, w)),
        ("PEFT LoRA's pattern (two nn.Linear, r=8)", lambda: F.linear(x, w) + lora_b(lora_a(x))),
        ("low-rank, `low_rank_linear` (r=8)", lambda: F.linear(x, w) + ops.low_rank_linear(x, a, b, 1.0)),
        ("rows, `row_linear`", lambda: F.linear(x, w) + ops.row_linear(x, row_block, rows, out_f, (0, rows.numel()))),
        ("columns, `column_linear`",
         lambda: F.linear(x, w) + ops.column_linear(x, col_block, cols, (0, cols.numel()))),
        ("columns and the frozen base in one op (S²FT, PaCA)",
         lambda: ops.column_linear(x, col_block, cols, (0, cols.numel()), w)),
        ("unstructured 0.10%, sparse kernels",
         lambda: F.linear(x, w) + ops.sparse_linear(x, v_small, idx_small, out_f)),
        (f"unstructured {density:.2%}, row blocks", lambda: F.linear(x, w) + ops.sparse_linear(x, v, idx, out_f)),
        (f"unstructured {density:.2%}, CSR + sampled gradient (training's path)",
         lambda: F.linear(x, w) + ops.sparse_linear(x, v, idx, out_f, None, layout)),
        (f"unstructured {density / 2:.2%} + r=4, CSR + sampled gradient, one op",
         lambda: F.linear(x, w) + ops.sparse_linear(x, v_half, idx_half, out_f, None, layout_half, 1.0, a4, b4, 1.0)),
        (f"unstructured {density:.2%}, fused one GEMM", lambda: ops.merged_sparse_linear(x, w, None, v, idx)),
        (f"unstructured {density / 2:.2%} + r=4, fused one GEMM",
         lambda: ops.merged_sparse_linear(x, w, None, v_half, idx_half, None, a4, b4, 1.0)),
        ("LoRA-GGPO r=8, `perturbed_linear`", lambda: perturbed_linear(x, w, None, std, 0, a, b, 1.0)),
    ]
    assert ops.product_mode(n, idx_small.numel(), out_f, in_f) == "sparse"
    assert ops.product_mode(n, idx.numel(), out_f, in_f) == "dense"
    return paths, x, dy, [w, std, v, v_small, v_half, a, b, a4, b4, row_block, col_block, idx, idx_small, idx_half,
                          rows, cols, *lora_a.parameters(), *lora_b.parameters()]


def _one_pass(forward, x, dy, held, device: str = "cpu") -> tuple[int, int]:
    """(saved for backward, peak of forward + backward) of one call, gradients included. `held`: the
    tensors that exist anyway (weights, trainable tensors): saved references to them cost nothing."""
    holder = torch.nn.Module()
    for i, t in enumerate(held):
        t.grad = None
        holder.register_buffer(f"t{i}", t)
    x.grad = None
    with saved_tensors(holder) as saved:
        y = forward()
    del y
    with peak_memory(device) as peak:
        forward().backward(dy)
    return saved.bytes, peak.bytes


def layer_rows(device: str = "cpu") -> list[list[str]]:
    rows = []
    for out_f, in_f in LAYER_SHAPES:
        paths, x, dy, held = _layer_paths(out_f, in_f, LAYER_TOKENS, device)
        weight = out_f * in_f * 4
        base = None
        for name, forward in paths:
            saved, peak = _one_pass(forward, x, dy, held, device)
            base = peak if base is None else base
            rows.append([f"{out_f} × {in_f}", name, f"{saved / MiB:.2f}", f"{peak / MiB:.2f}",
                         f"{(peak - base) / weight:.2f}"])
    rows += conv_rows(device)
    return rows


def conv_rows(device: str = "cpu") -> list[list[str]]:
    """A U-Net-sized Conv2d (320 → 320, 3 × 3, on 1 × 320 × 32 × 32) with an unstructured adapter, and the
    frozen conv alone."""
    from peft import get_peft_model

    from sparse_peft import SparseConfig

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(320, 320, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    frozen = Net().requires_grad_(False).to(device)
    model = get_peft_model(copy.deepcopy(frozen), SparseConfig(target_modules=["conv"], structure="unstructured",
                                                                equivalent_rank=8)).to(device)
    x = torch.randn(1, 320, 32, 32, device=device, requires_grad=True)
    dy = torch.randn(1, 320, 32, 32, device=device)
    weight = frozen.conv.weight.numel() * 4
    base_saved, base = _one_pass(lambda: frozen(x), x, dy, [*frozen.parameters()], device)
    saved, peak = _one_pass(lambda: model(x), x, dy, [*model.parameters(), *model.buffers()], device)
    density = sum(p.numel() for p in model.parameters() if p.requires_grad) / frozen.conv.weight.numel()
    return [["320 × 320 × 3 × 3 conv", "frozen conv alone", f"{base_saved / MiB:.2f}", f"{base / MiB:.2f}", "0.00"],
            ["320 × 320 × 3 × 3 conv", f"unstructured {density:.2%}, Conv2d (dense ΔW)", f"{saved / MiB:.2f}",
             f"{peak / MiB:.2f}", f"{(peak - base) / weight:.2f}"]]


def layer_table(device: str = "cpu") -> str:
    return run.markdown(["layer", "path", "saved for backward (MiB)", "peak, forward + backward (MiB)",
                         "peak over the frozen layer's, in weights"], layer_rows(device))


def section(wide: bool = True, device: str = "cpu") -> str:
    """All configurations' tables, for the report (run.py includes it)."""
    layer = (f"One layer, path by path ({LAYER_TOKENS} tokens, x requires grad; forward + backward of the frozen "
             "layer plus the update, gradients included; the last column is the peak minus the frozen layer's own, "
             "in units of the layer's fp32 weight):\n\n" + layer_table(device))
    return "\n\n".join([*(table(measure(*s, device=device)) for s in shapes(wide)), layer])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-wide", action="store_true", help="skip the hidden-1024 model")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--device", default="cpu", help="cpu (allocation events) or cuda (the allocator's peak)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(section(wide=not args.no_wide, device=args.device))


if __name__ == "__main__":
    main()
