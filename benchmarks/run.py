"""Every sparse_peft method next to PEFT LoRA, full fine-tuning and PEFT's SHiRA and Super-Tuning, on one small Llama.

One run, one model, one data stream. A random-init byte-level Llama is first pretrained briefly on
Python code (the standard library's own source), then every setup fine-tunes a copy of it on English
prose (Python's reference manual, `pydoc_data`) for the same steps, batches and learning rate, and
is evaluated on manual topics it never saw. Every adapter has PEFT LoRA's trainable count (r=8).
Per setup: trainable parameters, bytes saved for backward, bytes of weights, gradients and AdamW
state, step time (median), adapter file bytes and eval loss; with `--device cuda` also the CUDA
peak and tokens/s; then LoRA-GGPO's overhead by micro-batch size and SLTrain's pretraining. Each is also
divided by LoRA's: the ratios are the headline, not the times. Three sections of the page come from other
scripts (decoding: serving.py, the sparse products: csr_timings.py, the true step peak: peak.py) and are
restated by hand from their output: rewriting an existing page keeps them as they are.

    python benchmarks/run.py                          # CPU, about ten minutes; rewrites docs/benchmarks.md
    python benchmarks/run.py --quick --out /tmp/x.md  # a tiny model: every stage in well under a minute
    python benchmarks/run.py --device cuda --hidden 1024 --layers 8 --out /tmp/gpu.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# benchmarks/layer_timings.py would shadow the `kernels` package that transformers imports: keep this folder off the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.shira import ShiraConfig
from peft.tuners.supertuning import SupertuningConfig
from transformers import LlamaConfig, LlamaForCausalLM

import sparse_peft  # noqa: F401  (registers SparseConfig with PEFT)
from sparse_peft import METHODS, SparseConfig, SparseScheduler, calibrate
from sparse_peft.methods import knob_fields, lora_budget
from sparse_peft.memory import saved_tensors
from sparse_peft.selection import ACTIVATION_RULES


R = 8  # LoRA's rank; every adapter gets LoRA's trainable count at this rank
MASK_WARMUP = 4  # RoSA's warm-up, in optimizer steps: within --quick's 6 and the default 30 fine-tuning steps
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP = 2  # steps left out of the step-time median (first calls allocate and pick kernels)
# Fine-tuning learning rate, shared by every setup (AdamW, constant, no weight decay), from a sweep of
# the default run; printed in the report, so rerun the sweep (--lr) and update both when methods change.
LR = 1e-2
LR_SWEEP = """Eval loss after the default 30 steps at lr 3e-3 / 1e-2 / 3e-2 (before fine-tuning: 3.18):
PEFT LoRA 2.92 / 2.91 / 3.08 (on another init seed than the table's); sparse low-rank, DSEE and LoRA-GGPO are likewise best at 3e-3 or 1e-2 and
worse at 3e-2; the single-entry, row and column forms (SHiRA, Super-Tuning, SpIEL, SaRA, S²FT) keep
improving up to 3e-2 (e.g. sparse unstructured 3.02 / 2.88 / 2.85); full FT is best at 3e-3 (2.78 / 3.02
/ 3.46). 1e-2 is the one rate at which no adapter is far from its best."""
PRETRAIN_LR = 3e-3
MiB, KiB = 2**20, 2**10


# -- the setups -----------------------------------------------------------------------------------
@dataclass
class Budget:
    lora: int  # what PEFT LoRA r=R trains on TARGETS: r·(in + out) per layer
    entries: int  # all entries of the TARGETS weights


@dataclass
class Spec:
    name: str
    # builds the PEFT config from the budget; None trains nothing ("floor"), "full" trains everything
    config: Callable[[Budget], object] | str | None
    gc: bool = False  # gradient checkpointing: timed only, over --gc-steps


def method_kwargs(name: str, budget: Budget) -> dict:
    """SparseConfig fields that give method `name` LoRA's trainable count."""
    if METHODS[name].target_roles:  # the method picks its own layers (S²FT: o_proj, down_proj): LoRA's total over them
        # whole heads pooled over the layers: on a model with few layers, one head per layer would be far more
        # than LoRA's count (1.6x on benchmarks/peak.py's 2-layer wide model); pooled, the FFN channels take a
        # head's rounding back and the total is LoRA's
        return dict(num_trainable=budget.lora, allocation="global")
    fields = dict(lora_budget(name, R), target_modules=TARGETS)  # LoRA's rank, shared with a low-rank part if any
    if any(f.name == "warmup_steps" for f in knob_fields(METHODS[name])):
        fields["warmup_steps"] = MASK_WARMUP  # RoSA: a mask chosen within the short fine-tuning run
    return fields


# Extra rows: a method with other settings (name, method, fields over method_kwargs).
VARIANTS = [("spiel (momentum)", "spiel", dict(regrowth="momentum"))]


def specs() -> list[Spec]:
    def sparse(**fields):
        return lambda b: SparseConfig(target_modules=TARGETS, **fields)

    def method(name, **extra):
        return lambda b: SparseConfig(method=name, **{**method_kwargs(name, b), **extra})

    rows = [
        Spec("floor", None),
        Spec("full FT", "full"),
        Spec("PEFT LoRA", lambda b: LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=TARGETS)),
        # SHiRA's r gives r·(in + out) entries per layer, as LoRA's
        Spec("PEFT SHiRA", lambda b: ShiraConfig(r=R, random_seed=0, target_modules=TARGETS)),
        # one sparsity for all layers: LoRA's total, spread in proportion to each layer's size
        Spec("PEFT Super-Tuning",
             lambda b: SupertuningConfig(sparsity=1 - b.lora / b.entries, target_modules=TARGETS)),
        *(Spec(f"sparse {s}", sparse(structure=s, equivalent_rank=R)) for s in ("unstructured", "rows", "columns")),
        Spec("sparse low-rank", sparse(structure="none", r=R)),
        *(Spec(name, method(name)) for name in METHODS),  # every preset, the ones added later too
        *(Spec(name, method(m, **extra)) for name, m, extra in VARIANTS),
    ]
    by_name = {s.name: s for s in rows}
    # with gradient checkpointing, each compared with the checkpointed LoRA and floor
    gc_rows = [Spec(f"{n} (GC)", by_name[n].config, gc=True) for n in ("floor", "PEFT LoRA", "s2ft") if n in by_name]
    return rows + gc_rows


# -- model and data -------------------------------------------------------------------------------
def build_base(args) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),  # 256 -> 688, Llama's ratio of 11008 / 4096
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,  # grouped-query attention: k_proj and v_proj are narrower than q_proj
        vocab_size=256,  # bytes
        max_position_embeddings=args.seq,
        use_cache=False,  # as in training: no key/value cache outlives the forward
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def as_bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def corpora() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pretraining code, fine-tuning prose and held-out prose, as byte streams. Texts every Python
    installation has, so nothing is downloaded; every 8th manual topic is held out for eval."""
    from pydoc_data.topics import topics

    code = b"".join(f.read_bytes() for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")))
    names = sorted(topics)
    train = "\n\n".join(topics[n] for i, n in enumerate(names) if i % 8)
    held_out = "\n\n".join(topics[n] for i, n in enumerate(names) if i % 8 == 0)
    return as_bytes(code), as_bytes(train.encode()), as_bytes(held_out.encode())


def windows(stream: torch.Tensor, n: int, seq: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(len(stream) - seq, (n,), generator=g).tolist()
    return torch.stack([stream[s:s + seq] for s in starts])


def pretrain(base, code, args) -> float:
    """A short full pretraining on code, so that fine-tuning adapts a model that knows something
    (random weights would make magnitude-based supports meaningless). Returns its last loss."""
    opt = torch.optim.AdamW(base.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    loss = torch.tensor(float("nan"))
    for _ in range(args.pretrain_steps):
        ids = windows(code, args.batch, args.seq, g).to(args.device)
        loss = base(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def target_budget(base) -> Budget:
    layers = [m for n, m in base.named_modules() if n.split(".")[-1] in TARGETS]
    return Budget(sum(R * (m.in_features + m.out_features) for m in layers), sum(m.weight.numel() for m in layers))


def saved_bytes(fn, module: torch.nn.Module) -> int:
    """Bytes that autograd keeps for backward while running fn(), the module's own tensors left out."""
    with saved_tensors(module) as saved:
        fn()
    return saved.bytes


def file_bytes(folder: str, prefix: str = "") -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.startswith(prefix))


# -- one setup ------------------------------------------------------------------------------------
@dataclass
class Setup:
    """One model, its optimizer, its schedule, and what was measured on it."""

    spec: Spec
    args: argparse.Namespace
    model: Optional[torch.nn.Module] = None
    opt: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[SparseScheduler] = None
    error: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    m: dict = field(default_factory=dict)  # the measurements

    @property
    def cuda(self) -> bool:
        return self.args.device.startswith("cuda")

    def attempt(self, fn, *a):
        """Runs one stage; an exception turns this setup into an error row instead of ending the run."""
        if self.error is None:
            try:
                return fn(*a)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return None

    def build(self, base, budget: Budget, batches: list[torch.Tensor], steps: int) -> None:
        model = copy.deepcopy(base)  # every setup starts from the same weights
        # Adapters draw their initial values (LoRA's A, say) from the global generator: reseed, so that a
        # row's numbers do not depend on which rows were built before it.
        torch.manual_seed(0)
        if self.spec.gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.requires_grad_(self.spec.config == "full")
        config = None
        if callable(self.spec.config):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                config = self.spec.config(budget)
                model = get_peft_model(model, config)
            # what a method says about itself (e.g. that it is incomplete) goes into the report
            self.notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
        model = model.to(self.args.device)
        if isinstance(config, SparseConfig) and config.selection in ACTIVATION_RULES:
            calibrate(model, batches[:2], progress=False)  # supports chosen from activations: a forward pass first
        # Every setup backpropagates into the embedding output (as gradient checkpointing also makes it
        # do), so that "saved minus floor" is exactly what the method itself keeps.
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())
        self.model = model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.m["trainable"] = sum(p.numel() for p in trainable)
        if trainable:
            self.opt = torch.optim.AdamW(trainable, lr=self.args.lr, weight_decay=0.0)
        if isinstance(config, SparseConfig):
            # Any steps the method takes between updates (regrowth, penalties, noise) run through
            # SparseScheduler as a plain training loop does it: before_optimizer_step(), step().
            self.scheduler = SparseScheduler(self.model, self.opt, total_steps=steps)
        self.m["schedule"] = 0  # the most the schedule's statistics held at once

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss

    def step(self, ids: torch.Tensor) -> None:
        """One training step (forward, backward, AdamW, schedule), timed."""
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.loss(ids).backward()
        if self.opt is not None:
            if self.scheduler is not None:
                self.scheduler.before_optimizer_step()  # SaRA's penalty gradient, GGPO's next noise scale
            self.opt.step()
            if self.scheduler is not None:
                self.scheduler.step()
                if self.scheduler.enabled:
                    held = sum(t.nbytes for t in self.scheduler.state_dict().values())
                    self.m["schedule"] = max(self.m["schedule"], held)
            self.opt.zero_grad(set_to_none=False)  # keep the gradient buffers, as a training loop does
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - start)

    def measure_state(self) -> None:
        """Bytes of weights, gradients and optimizer state, after the optimizer has stepped."""
        states = self.opt.state.values() if self.opt else []
        self.m.update(
            weights=sum(t.nbytes for t in (*self.model.parameters(), *self.model.buffers())),
            grads=sum(p.grad.nbytes for p in self.model.parameters() if p.requires_grad and p.grad is not None),
            adamw=sum(t.nbytes for s in states for t in s.values() if torch.is_tensor(t)),
        )
        timed = self.times[WARMUP:] or self.times
        self.m.update(step_s=statistics.median(timed), mean_s=statistics.mean(timed))

    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor) -> None:
        self.model.eval()
        self.m["eval"] = self.loss(ids).item()
        self.model.train()

    def save(self) -> None:
        """Bytes of what this setup would ship: the adapter files, or the whole model for full FT."""
        if self.spec.config is None:
            return
        with tempfile.TemporaryDirectory() as folder:
            self.model.save_pretrained(folder)
            # PEFT also writes a README model card; the adapter is its config and its weights
            self.m["file"] = file_bytes(folder, "" if self.spec.config == "full" else "adapter_")

    def switch(self) -> None:
        """Seconds to fold the adapter into the base weights and take it out again, median of 5."""
        if not callable(self.spec.config):
            return
        times = []
        for _ in range(2 + 5):  # 2 warm-up rounds
            start = time.perf_counter()
            self.model.merge_adapter()
            self.model.unmerge_adapter()
            if self.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        self.m["switch_s"] = statistics.median(times[2:])

    def row(self) -> dict:
        row = dict(setup=self.spec.name, error=self.error, notes=self.notes)
        if self.error:  # what was measured before the failure would mislead next to complete rows
            return row
        return dict(row, scheduled=self.scheduler is not None and self.scheduler.enabled, **self.m)


def run_group(group: list[Spec], base, budget, batches, eval_ids, steps: int, args) -> tuple[list[dict], dict]:
    """Trains the setups of a group for `steps` steps on the same batches. They take turns step by
    step, so that a burst of load from another process on a shared machine slows all of them alike
    rather than one of them. Returns their rows, and the CPU copies of two models the per-layer check uses."""
    cuda = args.device.startswith("cuda")
    setups = [Setup(spec, args) for spec in group]
    for s in setups:
        s.attempt(s.build, base, budget, batches, steps)
        s.m["saved"] = s.attempt(saved_bytes, lambda: s.loss(batches[0]), s.model)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for ids in batches[:steps]:
        for s in setups:
            s.attempt(s.step, ids)
    for s in setups:
        if cuda:  # a group is one setup on CUDA, so the peak is its own
            s.m["peak"] = torch.cuda.max_memory_allocated()
        s.attempt(s.measure_state)
        if s.error is None and cuda:
            s.m["tok_s"] = batches[0].numel() / s.m["step_s"]
        if not s.spec.gc:  # checkpointed rows only time a few steps; the math is that of the row without GC
            s.attempt(s.evaluate, eval_ids)
            s.attempt(s.save)
            s.attempt(s.switch)
    kept = {s.spec.name: s.model.cpu() for s in setups
            if s.error is None and s.spec.name in ("PEFT LoRA", "sparse columns")}
    rows = [s.row() for s in setups]
    del setups
    gc.collect()  # PEFT models hold reference cycles: free this group's memory before the next
    if cuda:
        torch.cuda.empty_cache()
    return rows, kept


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
        (f"saved by PEFT LoRA r={R}", saved_bytes(lambda: lora(x), lora)),
    ]


# -- the report -----------------------------------------------------------------------------------
def markdown(head: list[str], body: list[list[str]]) -> str:
    lines = [head, ["---"] * len(head), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def metrics(cuda: bool) -> dict:
    """Column name: (value of a row, or None where it was not measured; format)."""

    def scaled(key, unit=1.0, keys=None):
        keys = keys or [key]
        return lambda r: sum(r[k] for k in keys) / unit if all(r.get(k) is not None for k in keys) else None

    cols = {
        "trainable params": (scaled("trainable"), "{:,.0f}"),
        "saved for backward (MiB)": (scaled("saved", MiB), "{:.2f}"),
        "added over floor (MiB)": (scaled("over_floor", MiB), "{:.2f}"),
        "weights (MiB)": (scaled("weights", MiB), "{:.2f}"),
        "grads (MiB)": (scaled("grads", MiB), "{:.2f}"),
        "AdamW state (MiB)": (scaled("adamw", MiB), "{:.2f}"),
        "weights + grads + AdamW (MiB)": (scaled("", MiB, ["weights", "grads", "adamw"]), "{:.2f}"),
        "schedule state (MiB)": (scaled("schedule", MiB), "{:.2f}"),
        "total (MiB)": (scaled("", MiB, ["saved", "weights", "grads", "adamw", "schedule"]), "{:.2f}"),
        "step (ms)": (scaled("step_s", 1e-3), "{:.1f}"),
        "adapter file (KiB)": (scaled("file", KiB), "{:,.1f}"),
        "eval loss": (scaled("eval"), "{:.3f}"),
    }
    if cuda:
        cols["peak CUDA (MiB)"] = (scaled("peak", MiB), "{:.1f}")
        cols["tokens/s"] = (scaled("tok_s"), "{:,.0f}")
    return cols


RATIO_SKIP = ("weights", "grads", "AdamW state", "schedule state")


def cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def tables(rows: list[dict], cuda: bool) -> tuple[str, str]:
    """The main table, and each setup's numbers divided by PEFT LoRA's (checkpointed rows by the
    checkpointed LoRA's, and their floor is the checkpointed floor); eval loss as a difference."""
    mode = lambda r: " (GC)" if r["setup"].endswith(" (GC)") else ""  # noqa: E731
    by_name = {r["setup"]: r for r in rows}
    for r in rows:
        floor = by_name.get("floor" + mode(r), {}).get("saved")
        r["over_floor"] = r["saved"] - floor if r.get("saved") is not None and floor is not None else None
    cols = metrics(cuda)
    main = markdown(["setup", *cols], [[r["setup"], *(cell(f(r), fmt) for f, fmt in cols.values())] for r in rows])

    def versus(name, f, r):
        lora = by_name.get("PEFT LoRA" + mode(r), {})
        mine, theirs = f(r), f(lora) if lora else None
        if mine is None or theirs is None:
            return "–"
        if name == "eval loss":
            return f"{mine - theirs:+.3f}"
        return f"{mine / theirs:.2f}" if theirs else "–"

    # the headline columns; the parts (weights, grads, AdamW, schedule) follow from the first table
    headline = {c: f for c, (f, _) in cols.items() if c.split(" (")[0] not in RATIO_SKIP}
    ratios = markdown(
        ["setup / PEFT LoRA", *(("eval loss − LoRA's" if c == "eval loss" else c.split(" (")[0]) for c in headline)],
        [[r["setup"], *(versus(c, f, r) for c, f in headline.items())]
         for r in rows if not r["setup"].startswith(("floor", "PEFT LoRA"))],
    )
    return main, ratios


def machine(device: str) -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    cpu = names[0] if names else (platform.processor() or platform.machine())
    text = (f"{cpu} ({os.cpu_count()} logical cores), {platform.system()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
            f"torch threads: {torch.get_num_threads()}, device `{device}`")
    if device.startswith("cuda"):
        text += f" ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})"
    return text


def schedule_table(rows: list[dict]) -> str:
    lora = next((r for r in rows if r["setup"] == "PEFT LoRA" and r.get("mean_s")), None)
    body = [[r["setup"], f"{r['step_s'] * 1e3:.1f}", f"{r['mean_s'] * 1e3:.1f}",
             f"{r['mean_s'] / lora['mean_s']:.2f}" if lora else "–"]
            for r in rows if r.get("scheduled") and r.get("mean_s")]
    if lora:
        body.insert(0, ["PEFT LoRA", f"{lora['step_s'] * 1e3:.1f}", f"{lora['mean_s'] * 1e3:.1f}", "1.00"])
    return markdown(["setup", "median step (ms)", "mean step (ms)", "mean / PEFT LoRA's"], body)


def switch_table(rows: list[dict]) -> str:
    lora = next((r.get("switch_s") for r in rows if r["setup"] == "PEFT LoRA"), None)
    return markdown(
        ["setup", "merge + unmerge (ms)", "/ PEFT LoRA"],
        [[r["setup"], f"{r['switch_s'] * 1e3:.2f}", f"{r['switch_s'] / lora:.2f}" if lora else "–"]
         for r in rows if r.get("switch_s")],
    )


def pretraining_rows(args) -> list[dict]:
    """SLTrain's own setting: training from scratch, every block linear W = (α/r)·B·A + S against a
    full-rank model of the same shape (paper: r = hidden/4, δ = 0.03). Same batches, the two models
    taking turns step by step (a burst of load slows both alike), median over 3 × --gc-steps steps."""
    from sparse_peft import sltrain

    g = torch.Generator().manual_seed(2)
    code = corpora()[0]
    batches = [windows(code, args.batch, args.seq, g).to(args.device) for _ in range(3 * args.gc_steps + WARMUP)]
    rank = args.hidden // 4
    runs = []
    for name, convert in (("full-rank", None),
                          (f"SLTrain r={rank}, δ=0.03", lambda m: sltrain.convert(m, rank=rank, density=0.03, alpha=32))):
        model = build_base(args)
        if convert is not None:
            convert(model)
        model = model.to(args.device).train()
        runs.append((name, model, torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR), []))
    for ids in batches:
        for _, model, opt, times in runs:
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    rows = []
    for name, model, opt, times in runs:
        saved = saved_bytes(lambda: model(input_ids=batches[0], labels=batches[0]).loss, model)
        state = sum(p.nbytes + p.grad.nbytes for p in model.parameters())
        state += sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        rows.append(dict(name=name, params=sum(p.numel() for p in model.parameters()), state=state, saved=saved,
                         step=statistics.median(times[WARMUP:])))
    return rows


def ggpo_overhead_rows(base, budget: Budget, train: torch.Tensor, args) -> list[dict]:
    """LoRA-GGPO's step against PEFT LoRA's as tokens per micro-batch grow. The noise costs a fixed
    amount per weight and pass (a Gaussian draw), the GEMMs a cost per token: the ratio is the point.
    The two take turns on the same batches, in alternating order; the ratio is the median of the
    per-step ratios (each step against its neighbour on the same batch), which a slow spell of the
    machine moves less than a ratio of two medians."""
    by_name = {s.name: s for s in specs()}
    group = [by_name["PEFT LoRA"], by_name["lora_ggpo"]]
    rows = []
    for batch in (1, 2) if args.quick else (1, 2, 4, 8):
        g = torch.Generator().manual_seed(3)
        # three times the checkpointed rows' steps: the two differ by a few percent, under CPU timing noise
        batches = [windows(train, batch, args.seq, g).to(args.device) for _ in range(3 * args.gc_steps + WARMUP)]
        setups = [Setup(spec, args) for spec in group]
        for s in setups:
            s.attempt(s.build, base, budget, batches, len(batches))
        for i, ids in enumerate(batches):
            for s in setups if i % 2 == 0 else setups[::-1]:
                s.attempt(s.step, ids)
        if any(s.error for s in setups):
            rows.append(dict(tokens=batch * args.seq, error="; ".join(s.error for s in setups if s.error)))
            continue
        lora, ggpo = (statistics.median(s.times[WARMUP:]) for s in setups)
        per_step = sorted(b / a for a, b in zip(setups[0].times[WARMUP:], setups[1].times[WARMUP:]))
        quartiles = statistics.quantiles(per_step, n=4) if len(per_step) > 1 else per_step * 3
        rows.append(dict(tokens=batch * args.seq, lora=lora, ggpo=ggpo, ratio=statistics.median(per_step),
                         low=quartiles[0], high=quartiles[-1]))
        del setups
        gc.collect()
    return rows


def ggpo_overhead_table(rows: list[dict]) -> str:
    body = [[f"{r['tokens']:,}", "error", "", r["error"], ""] if "error" in r else
            [f"{r['tokens']:,}", f"{r['lora'] * 1e3:.1f}", f"{r['ggpo'] * 1e3:.1f}", f"{r['ratio']:.2f}",
             f"{r['low']:.2f}-{r['high']:.2f}"]
            for r in rows]
    return markdown(["tokens per micro-batch", "PEFT LoRA step (ms)", "lora_ggpo step (ms)",
                     "lora_ggpo / LoRA (median of per-step ratios)", "middle half of the per-step ratios"], body)


def main_table_ggpo(rows: list[dict], args) -> str:
    """The main table's lora_ggpo / PEFT LoRA step, which the overhead table measures again at the same tokens."""
    by_name = {r["setup"]: r for r in rows}
    lora, ggpo = by_name.get("PEFT LoRA", {}).get("step_s"), by_name.get("lora_ggpo", {}).get("step_s")
    if not (lora and ggpo):
        return ""
    return (f"The main table measures the same pair at {args.batch * args.seq:,} tokens per step among all the "
            f"setups (ratio of medians): {ggpo / lora:.2f} in this run. Where the two figures for one token count "
            "differ, the difference is this machine's timing noise (±10-20% on a shared CPU), not two behaviours: "
            "repeated runs on this machine gave 0.95-1.00 there and 0.97-1.01 here at 1,024 tokens.")


def pretraining_table(rows: list[dict]) -> str:
    full = rows[0]
    body = [[r["name"], f"{r['params']:,}", f"{r['state'] / MiB:.2f}", f"{r['saved'] / MiB:.2f}",
             f"{(r['state'] + r['saved']) / MiB:.2f}", f"{(r['state'] + r['saved']) / (full['state'] + full['saved']):.2f}",
             f"{r['step'] * 1e3:.1f}", f"{r['step'] / full['step']:.2f}"] for r in rows]
    return markdown(["model", "parameters", "weights + grads + AdamW (MiB)", "saved for backward (MiB)", "total (MiB)",
                     "total / full-rank", "step (ms)", "step / full-rank"], body)


def report(rows, check, args, shape: str, pretrain_loss: float, seconds: float, pretraining: str = "",
           ggpo: str = "") -> str:
    cuda = args.device.startswith("cuda")
    main, ratios = tables(rows, cuda)
    check_table = (markdown(["down_proj of layer 0", "MiB"], [[n, f"{b / MiB:.3f}"] for n, b in check])
                   if check else "(not run: the PEFT LoRA or sparse columns setup failed)")
    errors = "\n".join(f"- **{r['setup']}**: `{r['error']}`" for r in rows if r.get("error")) or "None."
    notes = "\n".join(f"- **{r['setup']}**: {n}" for r in rows if not r["setup"].endswith("(GC)")
                      for n in r.get("notes", [])) or "None."
    cuda_columns = ("\n\n*Peak CUDA* is `torch.cuda.max_memory_allocated()` over the training steps, each setup run "
                    "alone (reset after the saved-for-backward pass); *tokens/s* is the tokens of one batch divided "
                    "by the median step." if cuda else "")
    decode = restated("Decoding with the adapter unmerged", "serving.py", "decoding time per token against LoRA's")
    csr = restated("The CSR product, layer by layer", "csr_timings.py", "the sparse products' timings")
    peak = restated("True peak memory of a training step", "peak.py", "each method's step peak against LoRA's")
    return f"""# Benchmarks: memory, speed and a fixed training budget

Generated by `benchmarks/run.py`, except the sections that say they are restated from another script's
output (decoding, the CSR products, the true step peak): run.py keeps those as they are when it rewrites
this page.

- Command: `{" ".join(["python benchmarks/run.py", *sys.argv[1:]])}` ({seconds / 60:.1f} minutes)
- Machine: {machine(args.device)}
- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Model: byte-level Llama ({shape}), fp32, SDPA attention; batch {args.batch} × {args.seq} tokens
- Base: random init, then fully pretrained for {args.pretrain_steps} steps on the Python standard library's
  source (AdamW, lr {PRETRAIN_LR:g}; last batch loss {pretrain_loss:.3f})
- Fine-tuning: every setup {args.train_steps} steps on the same batches of Python's reference manual
  (`pydoc_data`), AdamW, constant lr {args.lr:g} for all, no weight decay; eval on {args.eval_batch} × {args.seq}
  tokens of held-out manual topics
- Adapters on {", ".join(TARGETS)}, each at PEFT LoRA r={R}'s trainable count (see below)

{main}

Each setup divided by PEFT LoRA (eval loss: the difference):

{ratios}

## How the budgets match

PEFT LoRA is r={R}, `lora_alpha`={R}, no dropout: r·(in + out) trainable entries per layer. PEFT SHiRA
with r={R} trains as many single entries per layer (random mask). PEFT Super-Tuning takes one
sparsity for all layers, set so its total is LoRA's; it spreads them in proportion to each layer's size
and keeps the largest-magnitude entries. The sparse structure rows use `equivalent_rank={R}`
(unstructured, rows, columns) or `structure="none", r={R}` (low-rank). Each `method=` preset gets
`equivalent_rank={R}`; a preset with a low-rank part of its own gets `r={R // 2}` and `equivalent_rank={R}`
(half the budget each); a low-rank-only preset gets `r={R}`; a preset that picks its own layers (S²FT:
o_proj and down_proj) gets `num_trainable` = LoRA's total over all seven targets, spread over the
layers it picks, so that every row trains as many parameters as LoRA. Rows and columns come
in whole rows and columns (S²FT's in whole heads of o_proj, pooled over the layers with
`allocation='global'`), so counts differ from LoRA's by a rounding.

## How to read it

*Trainable params* is what the optimizer steps. *Saved for backward* is every tensor autograd keeps
from one forward pass of the loss, each storage counted once, weights and buffers left out (they are
in memory anyway). The *floor* trains nothing but still backpropagates into the embedding output, as
every setup here does: it is the activation memory of sending a gradient through the frozen network,
and its eval loss is that of the base before fine-tuning. *Added over floor* is what each method
itself keeps. LoRA and the sparse layers should add about one copy of each targeted layer's input
(q/k/v share one input, as do gate/up, and o_proj's input is a view of the attention output that
SDPA keeps anyway); LoRA also keeps its rank-r hidden `x Aᵀ`, which our low-rank op recomputes.
The column form keeps only `x[:, cols]`, the columns it trains, so it adds a fraction of the
others. SHiRA and Super-Tuning add the base weight and their delta into a new dense weight in each
forward, which autograd keeps. *Weights* include the frozen base and the adapters' index buffers;
*grads* and *AdamW state* cover what trains; *weights + grads + AdamW* is their sum, the parameter,
gradient and optimizer bytes; *schedule state* is the most a method's schedule
(`SparseScheduler`) held at once (for SpIEL's gradient regrowth a candidate position and a gradient sum per trainable
entry during a window; for momentum regrowth one fp32 accumulator per row and per column of each
weight); *total* is saved for backward + weights + grads + AdamW + schedule state, the memory a training step holds at its peak on top of
the transient buffers it forms and drops, which [True peak memory of a training step](#true-peak-memory-of-a-training-step)
measures. The byte counts are exact and do not depend on the load of the machine.

*Step* is the median time of a training step (forward, backward, AdamW step, and the method's
schedule step), over the {args.train_steps - WARMUP} steps after {WARMUP} warm-up steps, the setups taking
turns step by step; on a CPU it reflects CPU kernels, not what a GPU would show. *Adapter file* is what
`save_pretrained` writes for the adapter (`adapter_config.json` and `adapter_model.safetensors`;
the full-FT row: the whole model). *Eval loss* is the mean next-byte cross-entropy on the held-out
batch after the {args.train_steps} steps: a short, fixed budget at one shared learning rate, so it
says whether and how fast a method learns, not where it would end up with its own tuned rate and a
full run. It also moves with the initial values: when this benchmark was written, PEFT LoRA's eval loss
at the default settings ranged over 2.87–2.91 across four init seeds (every row here uses seed 0), so
differences of a few hundredths between rows are noise. Checkpointed (GC) rows are timed over
{args.gc_steps} steps after the warm-up and not evaluated (same math as the row without GC).{cuda_columns}

## Learning rate

One rate for every setup: {args.lr:g}{"" if args.lr == LR else f", set with --lr (the default is {LR:g})"}.
The default comes from a sweep of the default run, at the time it was chosen:

{LR_SWEEP}

## Schedules over the whole run

Setups whose `SparseScheduler` is active, their median step next to their mean step over the same
{args.train_steps - WARMUP} steps: the mean includes the steps where the schedule does more work (SpIEL's default
regrows every 20 steps from 5 steps of statistics, so its reselections come after steps 5 and 25).

{schedule_table(rows)}

## Per-layer check: the column form

The down_proj of layer 0 alone, run on a random input that requires grad:

{check_table}

## Switching adapters in place

Folding the trained adapter into the base weights and taking it out again (`merge_adapter()` then
`unmerge_adapter()`), median of 5 after 2 warm-up rounds: what serving many adapters on one base
by in-place switching costs. LoRA builds a dense B·A per layer; the sparse adapters scatter their
values (`index_put_` / `index_add_`).

{switch_table(rows)}

{decode}{csr}## LoRA-GGPO's overhead and tokens per micro-batch

PEFT LoRA and `lora_ggpo` (same rank, same batches, taking turns), median step over {3 * args.gc_steps} steps after
{WARMUP} warm-up steps, at several batch sizes of {args.seq}-token sequences. GGPO's noise is one Gaussian draw of
out × in per layer in the forward and one in the backward, a cost per weight; the GEMMs cost per token.
The LoRA update is folded into the noisy scratch weight (one GEMM per pass, no per-token LoRA products
or adds), which pays for the draws once a micro-batch has enough tokens. On a GPU the draw is a
bandwidth-bound Philox kernel. {main_table_ggpo(rows, args)}

{ggpo or "(not run)"}

{peak}## Pretraining from scratch: SLTrain against full rank

SLTrain's own setting (`sparse_peft.pretraining.convert`): the same model shape trained from random
weights, every block linear replaced by (α/r)·B·A + S, against the plain full-rank model; embeddings,
norms and the output head stay dense in both. AdamW on every parameter, the same batches, the two
models taking turns step by step; step is the median over {3 * args.gc_steps} steps after {WARMUP} warm-up steps. The saving
is in weights, gradients and optimizer state; activations are the same (each layer still keeps its
input). Quality at matched size is in `examples/sltrain/pretrain.py`.

{pretraining or "(not run)"}

## What the methods said

Warnings raised while each setup was built (an incomplete method says so):

{notes}

## Errors

A setup that fails is reported here and left out of the numbers; the other setups still run.

{errors}
"""


RESTATED = "<!-- restated by hand from the output of `python benchmarks/"  # a section another script owns


def restated(heading: str, script: str, what: str) -> str:
    """A section of the page that another script measures: run.py writes its heading and a marker, and keeps the
    page's own text of it (restated by hand from that script's output) when it rewrites an existing page."""
    return (f"## {heading}\n\n{RESTATED}{script}`; benchmarks/run.py keeps this section -->\n\n"
            f"(not measured by run.py: run `python benchmarks/{script}` for {what}, and restate its tables here)\n\n")


def keep_restated(new: str, old: str) -> str:
    """`new` with each section that another script owns taken from `old`, the page it replaces, where `old` has it."""
    def split(page: str) -> list[str]:
        return re.split(r"(?m)^(?=## )", page)

    kept = {chunk.split("\n", 1)[0]: chunk for chunk in split(old) if RESTATED in chunk}
    page = "".join(kept.pop(chunk.split("\n", 1)[0], chunk) if RESTATED in chunk else chunk for chunk in split(new))
    for heading in kept:  # a restated section whose heading run.py does not write (renamed by hand?): not lost unsaid
        print(f"run.py: the page's restated section {heading!r} has no heading of that name in run.py's page: "
              "dropped; restore it by hand", file=sys.stderr)
    return page


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and budget: a smoke test, well under a minute")
    p.add_argument("--hidden", type=int, help="hidden size (default 256, --quick 64)")
    p.add_argument("--layers", type=int, help="decoder layers (default 4, --quick 2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 256, --quick 64)")
    p.add_argument("--batch", type=int, help="sequences per batch (default 4, --quick 2)")
    p.add_argument("--pretrain-steps", type=int, help="full pretraining steps of the base (default 100, --quick 10)")
    p.add_argument("--train-steps", type=int, help="fine-tuning steps of every setup, the first 2 untimed "
                   "(default 30, --quick 6)")
    p.add_argument("--gc-steps", type=int, help="timed steps of the checkpointed rows (default 5, --quick 2)")
    p.add_argument("--eval-batch", type=int, help="held-out sequences of the eval loss (default 8, --quick 2)")
    p.add_argument("--lr", type=float, default=LR, help="fine-tuning learning rate of every setup")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--out", "--output", dest="out", default="docs/benchmarks.md", help="where to write the page")
    p.add_argument("--no-write", action="store_true", help="print the page only")
    args = p.parse_args()
    defaults = dict(hidden=(256, 64), layers=(4, 2), seq=(256, 64), batch=(4, 2), pretrain_steps=(100, 10),
                    train_steps=(30, 6), gc_steps=(5, 2), eval_batch=(8, 2))
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.train_steps <= WARMUP:
        p.error(f"--train-steps must be more than the {WARMUP} warm-up steps")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    if args.threads:
        # One thread by default: on a shared or small machine, a busy core stalls every parallel
        # kernel at its barrier, and step times swing by 10x; one thread keeps them comparable.
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    code, train, held_out = corpora()
    base = build_base(args).to(args.device)
    c = base.config
    shape = (f"hidden {c.hidden_size}, intermediate {c.intermediate_size}, {c.num_hidden_layers} layers, "
             f"{c.num_attention_heads} heads, {c.num_key_value_heads} kv heads, vocab {c.vocab_size}")
    print(f"pretraining the base for {args.pretrain_steps} steps", file=sys.stderr)
    pretrain_loss = pretrain(base, code, args)
    base = base.cpu()  # each setup copies it to the device
    g = torch.Generator().manual_seed(0)  # the same batches, in the same order, for every setup
    batches = [windows(train, args.batch, args.seq, g).to(args.device) for _ in range(args.train_steps)]
    eval_ids = windows(held_out, args.eval_batch, args.seq, g).to(args.device)
    budget = target_budget(base)

    # On a CPU the setups are built at once and take turns; on CUDA one at a time, so that each peak
    # of allocated memory belongs to one setup. Checkpointed rows form a group of their own, timed only.
    all_specs = specs()
    groups = [[s for s in all_specs if not s.gc], [s for s in all_specs if s.gc]]
    if args.device.startswith("cuda"):
        groups = [[s] for group in groups for s in group]
    rows, kept = [], {}
    for group in groups:
        print(f"running {', '.join(s.name for s in group)}", file=sys.stderr)
        steps = args.gc_steps + WARMUP if group[0].gc else args.train_steps
        group_rows, group_kept = run_group(group, base, budget, batches, eval_ids, steps, args)
        rows += group_rows
        kept.update(group_kept)
    check = layer_check(kept, args) if len(kept) == 2 else None

    print("LoRA-GGPO against LoRA at several micro-batch sizes", file=sys.stderr)
    ggpo = ggpo_overhead_table(ggpo_overhead_rows(base, budget, train, args))
    print("pretraining from scratch: full rank and SLTrain", file=sys.stderr)
    pretraining = pretraining_table(pretraining_rows(args))
    text = report(rows, check, args, shape, pretrain_loss, time.perf_counter() - started, pretraining, ggpo)
    if os.path.exists(args.out):
        with open(args.out) as f:
            text = keep_restated(text, f.read())
    print(text)
    if not args.no_write:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
