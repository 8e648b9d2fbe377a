"""LoRA-GGPO (Chang et al., 2025, arXiv v1): LoRA with gradient-guided weight perturbation.

Our reconstruction of v1 (no official code was published): each training forward adds Gaussian
noise to the merged weight, row-wise scaled by the weight and previous-step gradient norms.

Default targets ("all-linear"): every linear layer except the output head; all of the paper's runs
put LoRA (r = 8, α = 16) on all linear layers.

Per-step work (`Perturbation`): before each optimizer step, the row-wise noise scale of the next
steps' forwards, from the weight norms and this step's gradients (paper Eq. 6-8), and a fresh seed.
The noise itself is the layer's general base-weight noise (`layer.sparse_noise`, perturbation.py).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..full import full, full_grad
from ..perturbation import ggpo_row_std, row_sq_norms
from ._base import Method, Run


@dataclass
class GgpoKnobs:
    perturbation: Literal["ggpo", "none"] = field(default="ggpo", metadata={
        "help": "'ggpo' adds Gaussian noise to the merged weight in each training forward, row-wise scaled by the "
        "weight and gradient norms of the previous step; 'none' trains plain LoRA."})
    perturbation_sigma: float = field(default=0.03, metadata={"help": "The noise scale σ."})
    perturbation_beta: float = field(default=0.01, metadata={
        "help": "The weight β of the gradient norm against the weight norm."})


class LoraGgpo(Method):
    title = "LoRA-GGPO: gradient-guided perturbation optimization"
    paper = "https://arxiv.org/abs/2502.14538"
    defaults = dict(structure="none", r=8)
    Knobs = GgpoKnobs

    def check(self, config) -> None:
        k = config.knobs
        if k.perturbation not in ("none", "ggpo"):
            raise ValueError(f"perturbation={k.perturbation!r}: use 'none' or 'ggpo'")
        if k.perturbation == "ggpo" and config.r == 0:
            raise ValueError("perturbation='ggpo' scales its noise by the low-rank update's norms: set r > 0")
        for name in ("perturbation_sigma", "perturbation_beta"):
            value = getattr(k, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name}={value!r} must be >= 0")
        unused = [n for n in ("perturbation_sigma", "perturbation_beta") if n in config.given]
        if k.perturbation == "none" and unused:
            shown = ", ".join(f"{n}={getattr(k, n)!r}" for n in unused)
            raise ValueError(f"{shown} has no effect with perturbation='none': set perturbation='ggpo'; remove it or "
                             "enable what it tunes")

    def has_steps(self, config) -> bool:
        return config.knobs.perturbation == "ggpo"

    def steps(self, run: Run) -> list:
        k = run.config.knobs
        return [Perturbation(run, k.perturbation_sigma, k.perturbation_beta)] if self.has_steps(run.config) else []

    def card_lines(self, config) -> list[str]:
        k = config.knobs
        return [f"GGPO perturbation σ={k.perturbation_sigma:g}, β={k.perturbation_beta:g}"] if self.has_steps(config) else []


class Perturbation:
    def __init__(self, run: Run, sigma: float, beta: float):
        self.run, self.sigma, self.beta = run, sigma, beta
        self.layers = {n: m for n, m in run.layers.items() if run.adapter in m.sparse_lora_A}
        self.w0_row_sq = {}
        for name, layer in self.layers.items():
            layer.check_perturbable()
            self.w0_row_sq[name] = row_sq_norms(layer._base_weight_2d())
        self._refresh(1, with_grads=False)

    @torch.no_grad()
    def _refresh(self, t: int, with_grads: bool) -> float:
        """The noise of optimizer step t: its scale, and a seed of its own."""
        adapter, mean_std = self.run.adapter, 0.0
        for name, layer in self.layers.items():
            a, b = layer.sparse_lora_A[adapter], layer.sparse_lora_B[adapter]
            grads = (full_grad(a), full_grad(b)) if with_grads else (None, None)
            std = ggpo_row_std(
                self.w0_row_sq[name].to(a.device), full(a), full(b), *grads, layer.sparse_scaling[adapter], self.sigma,
                self.beta,
            )
            # a fresh noise seed per step and layer; fixed within the step, so gradient checkpointing's
            # recomputed forward and the backward redraw exactly the same noise
            seed = zlib.crc32(f"{self.run.config.seed}/{t}/{name}".encode())
            layer.sparse_noise[adapter] = (std, seed)
            mean_std += float(std.mean())
        return mean_std / max(len(self.layers), 1)

    def before_optimizer_step(self, t: int) -> dict:
        # the gradients of step t set the noise of step t + 1's forwards
        return {"sparse/perturbation_std": self._refresh(t + 1, with_grads=True)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        # the scale of the next step's noise depends on the last step's gradients, which a checkpoint
        # does not hold: keep the scale itself (out floats per layer); the seed follows from the step
        return {f"noise.{name}": layer.sparse_noise[self.run.adapter][0] for name, layer in self.layers.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], t: int) -> None:
        """Resume after t optimizer steps: the noise of step t + 1, as the interrupted run had it."""
        self._refresh(t + 1, with_grads=False)  # the seeds, and a scale for layers the state lacks
        adapter = self.run.adapter
        for name, layer in self.layers.items():
            std = state.get(f"noise.{name}")
            if std is not None:
                layer.sparse_noise[adapter] = (std.to(layer.sparse_lora_A[adapter].device), layer.sparse_noise[adapter][1])
