"""LoRA-GGPO against plain LoRA on a small, noisy, over-parameterised fine-tuning task: held-out loss curves.

    python examples/lora_ggpo/double_descent.py                       # a few minutes on 2 CPU cores
    python examples/lora_ggpo/double_descent.py --steps 5 --seeds 1 --pretrain_steps 20   # smoke test

The task is built here; nothing is downloaded. A small MLP is pretrained on task A, regressing the outputs of a
random teacher network. Rank-8 adapters then fine-tune it on task B (the same teacher features, read out another
way) from only --n_train examples whose targets carry Gaussian noise as large as the signal. The adapters have
many more parameters than there are examples (8,456 against 500), so they can fit the noise, and plain LoRA
does: its held-out loss (on clean targets) falls, then climbs as it memorises the noise. LoRA-GGPO trains the
same LoRA with noisy forwards (the frozen weight plus noise scaled, row by row, by the weight's and the last
gradient's norms), which pushes it towards flat minima. The paper (arXiv 2502.14538) says this damps the rise;
this script measures it.

Both get the same base, data, steps, learning rate and seeds; only the perturbation differs: plain LoRA
is `SparseConfig(structure="none", r=8)`, the same low-rank code without noise. The loop is plain PyTorch; the
`SparseScheduler` it makes runs around every `opt.step()` by itself, as inside a Trainer.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import get_peft_model

from sparse_peft import SparseConfig, SparseScheduler


IN, HIDDEN, FEATURES = 32, 256, 64  # input size, MLP width, teacher features
TARGETS = ["fc1", "fc2", "head"]  # every linear layer gets an adapter


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 1)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x))))).squeeze(-1)


def teachers():
    """Tasks A and B: one random feature map, two correlated readouts (cosine about 0.7)."""
    g = torch.Generator().manual_seed(1234)
    features = torch.randn(IN, FEATURES, generator=g) / math.sqrt(IN)
    readout_a = torch.randn(FEATURES, generator=g)
    readout_b = readout_a + torch.randn(FEATURES, generator=g)
    scale = 1 / 6  # puts the targets at about unit variance
    return [lambda x, r=r: scale * F.relu(x @ features) @ r for r in (readout_a, readout_b)]


def pretrain(task_a, steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(256, IN, generator=g)  # fresh data every step: the base is not overfitted
        loss = F.mse_loss(model(x), task_a(x))
        opt.zero_grad(), loss.backward(), opt.step()
    return model.eval()


def eval_steps(total: int, points: int = 60) -> list[int]:
    """Steps at which the held-out loss is measured: evenly spaced on a log scale, as the curve is plotted."""
    return sorted({0, total} | {round(total ** (i / points)) for i in range(points + 1)})


def finetune(base, config, x, y, x_test, y_test, args, seed) -> list[float]:
    """Full-batch AdamW on the noisy examples; the held-out loss at eval_steps()."""
    torch.manual_seed(seed)  # the same adapter initialisation for both methods
    model = get_peft_model(copy.deepcopy(base), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    SparseScheduler(model, opt, total_steps=args.steps)  # GGPO's noise; it runs around every opt.step() by itself
    curve, measure = [], set(eval_steps(args.steps))
    for step in range(args.steps + 1):
        if step in measure:
            model.eval()  # eval forwards are clean: GGPO's noise is for training only
            with torch.no_grad():
                curve.append(F.mse_loss(model(x_test), y_test).item())
            model.train()
        if step == args.steps:
            return curve
        F.mse_loss(model(x), y).backward()
        opt.step()  # its pre-step hook sets the next forwards' noise scale from these gradients
        opt.zero_grad()


def plot(steps, curves: dict, base_loss: float, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, runs in curves.items():
        runs = torch.tensor(runs)
        (line,) = ax.plot(steps, runs.mean(0), label=label)
        if len(runs) > 1:  # the spread over seeds
            ax.fill_between(steps, runs.min(0).values, runs.max(0).values, color=line.get_color(), alpha=0.15)
    ax.axhline(base_loss, color="gray", linestyle=":", label="base model, not fine-tuned")
    ax.set_xscale("symlog", linthresh=1)  # the minimum comes early, the rise takes long: a log scale shows both
    ax.set_xlim(0, args.steps)
    ax.set(xlabel="optimizer step", ylabel="held-out MSE (clean targets)",
           title=f"{args.n_train} noisy examples, rank-{args.r} adapters, mean of {args.seeds} seeds")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="fine-tuning steps per run (default %(default)s)")
    p.add_argument("--pretrain_steps", type=int, default=1000, help="base steps on task A (default %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, averaged (default %(default)s)")
    p.add_argument("--n_train", type=int, default=500, help="noisy training examples (default %(default)s)")
    p.add_argument("--noise", type=float, default=1.0, help="target noise std / signal std (default %(default)s)")
    p.add_argument("--r", type=int, default=8, help="adapter rank (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--sigma", type=float, nargs="+", default=[0.03, 0.3],
                   help="GGPO noise scales to compare: the paper's 0.03 and a 10x larger one (default %(default)s)")
    p.add_argument("--beta", type=float, default=0.01, help="GGPO gradient-norm weight (default %(default)s)")
    p.add_argument("--output_dir", default="out/ggpo-double-descent",
                   help="where the plot goes (default %(default)s; out/ is git-ignored)")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    task_a, task_b = teachers()
    base = pretrain(task_a, args.pretrain_steps)
    g = torch.Generator().manual_seed(10_000)
    x_test = torch.randn(2000, IN, generator=g)
    y_test = task_b(x_test)
    configs = {"lora": SparseConfig(structure="none", r=args.r, target_modules=TARGETS)}
    for sigma in args.sigma:
        configs[f"ggpo σ={sigma:g}"] = SparseConfig(method="lora_ggpo", r=args.r, perturbation_sigma=sigma,
                                                    perturbation_beta=args.beta, target_modules=TARGETS)
    with torch.no_grad():
        base_loss = F.mse_loss(base(x_test), y_test).item()
    adapter_params = sum(p.numel() for p in get_peft_model(copy.deepcopy(base), configs["lora"]).parameters()
                         if p.requires_grad)
    print(f"{args.n_train} noisy examples, {adapter_params:,} adapter parameters; "
          f"held-out MSE of the base {base_loss:.3f}")

    curves = {label: [] for label in configs}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)  # each seed: its own sample, noise and adapter initialisation
        x = torch.randn(args.n_train, IN, generator=g)
        clean = task_b(x)
        y = clean + args.noise * clean.std() * torch.randn(args.n_train, generator=g)
        for label, config in configs.items():
            curves[label].append(finetune(base, config, x, y, x_test, y_test, args, seed))
            print(f"seed {seed} {label}: done ({time.perf_counter() - start:.0f}s)")

    steps = eval_steps(args.steps)
    print(f"\nheld-out MSE, mean of {args.seeds} seeds\n{'method':<14}{'min':>8}{'at step':>9}{'peak after':>12}"
          f"{'final':>8}{'rise':>8}")
    for label, runs in curves.items():
        mean = torch.tensor(runs).mean(0)
        low = int(mean.argmin())
        peak = float(mean[low:].max())
        print(f"{label:<14}{mean[low]:>8.3f}{steps[low]:>9}{peak:>12.3f}{mean[-1]:>8.3f}{mean[-1] - mean[low]:>8.3f}")
    print("rise = final - min: what the bump costs a run that is not stopped early")
    plot(steps, curves, base_loss, out / "double_descent.png", args)
    (out / "curves.json").write_text(json.dumps(dict(steps=steps, base=base_loss, curves=curves, args=vars(args))))
    print(f"plot: {out / 'double_descent.png'}, curves: {out / 'curves.json'} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
