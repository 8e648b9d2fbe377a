"""SpIEL (Ansell et al., 2024): a random sparse delta per weight, pruned and regrown during training.

Default targets ("all-linear"): every linear layer except the output head. The official tuner's
default is every nn.Linear under the base model prefix (so not lm_head), and the paper's LLM runs
train q, k, v, o, gate, up and down, which is the same set on a Llama.

Timeline, with R = reselection_steps and A = accumulation_steps, t counting updates from 1:
reselections happen after updates A, A + R, A + 2R, ... before the last; each one looks at the A
updates before it. The first one, for gradient regrowth, replaces the whole random start (the
paper's choice); later ones drop a fraction that decays to 0 at the last update. Indices and
values are rewritten in place (same tensors, same size, so the optimizer keeps its references) and
the optimizer's per-element state moves with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .._util import unwrap_optimizer
from ..full import full, full_grad, write_
from ..optim import SparseSM3, sm3_accumulate
from ..regrowth import (
    GradientProbe, attach_probes, detach_probes, drop_fraction, gather_candidates, regrow, remap_optimizer_state,
    top_positions,
)
from ._base import Method, Run


@dataclass
class SpielKnobs:
    reselection_steps: int = field(default=20, metadata={
        "help": "Every this many optimizer steps, drop part of the support and regrow it elsewhere. 0 keeps the "
        "support fixed (and the knobs below then have no effect)."})
    accumulation_steps: int = field(default=5, metadata={
        "help": "Optimizer steps of gradient statistics behind each regrowth; the first regrowth comes after this "
        "many steps."})
    initial_reselection_rate: float = field(default=0.2, metadata={
        "help": "Fraction of the support dropped at a regrowth, decaying to 0 at the last step."})
    reselection_rate_policy: Literal["linear", "cosine"] = field(default="linear", metadata={
        "help": "How the dropped fraction decays: 'linear' or 'cosine'."})
    regrowth: Literal["gradient", "momentum"] = field(default="gradient", metadata={
        "help": "Where new entries grow: 'gradient' (largest accumulated gradient over the last accumulation_steps) "
        "or 'momentum' (largest SM3-style row x column accumulator, O(rows + cols) memory)."})


class Spiel(Method):
    title = "SpIEL: sparse fine-tuning with index pruning and regrowth"
    paper = "https://arxiv.org/abs/2401.16405"
    defaults = dict(structure="unstructured", selection="random", density=0.01, r=0)
    Knobs = SpielKnobs

    def check(self, config) -> None:
        knobs = config.knobs
        if not isinstance(knobs.reselection_steps, int) or knobs.reselection_steps < 0:
            raise ValueError(f"reselection_steps={knobs.reselection_steps!r} must be an integer >= 0 (0: fixed support)")
        if knobs.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={knobs.accumulation_steps!r} must be >= 1")
        if not 0 < knobs.initial_reselection_rate <= 1:
            raise ValueError(f"initial_reselection_rate={knobs.initial_reselection_rate!r} must be in (0, 1], e.g. 0.2")
        if knobs.reselection_rate_policy not in ("linear", "cosine"):
            raise ValueError(f"reselection_rate_policy={knobs.reselection_rate_policy!r}: use 'linear' or 'cosine'")
        if knobs.regrowth not in ("gradient", "momentum"):
            raise ValueError(f"regrowth={knobs.regrowth!r}: use 'gradient' or 'momentum'")
        if not knobs.reselection_steps:
            unused = [n for n in ("accumulation_steps", "initial_reselection_rate", "reselection_rate_policy", "regrowth")
                      if n in config.given]
            if unused:
                shown = ", ".join(f"{n}={getattr(knobs, n)!r}" for n in unused)
                raise ValueError(f"{shown} has no effect with reselection_steps=0 (a fixed support): set "
                                 "reselection_steps > 0 to regrow; remove it or enable what it tunes")
            return
        if config.structure != "unstructured":
            raise ValueError("reselection_steps > 0 regrows single entries, so it needs structure='unstructured'")
        if not 1 <= knobs.accumulation_steps <= knobs.reselection_steps:
            raise ValueError(f"accumulation_steps={knobs.accumulation_steps!r} must be between 1 and reselection_steps "
                             f"({knobs.reselection_steps})")
        if not config.store_indices:
            raise ValueError("store_indices=False regenerates a fixed support from the seed, and regrowth moves it: "
                             "use one of them")

    def has_steps(self, config) -> bool:
        return config.knobs.reselection_steps > 0 and config.structure == "unstructured"

    def run_length_needed(self, config) -> str:
        return "the regrowth schedule needs the run's total number of optimizer steps" if self.has_steps(config) else ""

    def steps(self, run: Run) -> list:
        layers = {n: m for n, m in run.layers.items() if run.adapter in m.sparse_values}
        return [Regrowth(run, layers)] if layers and self.has_steps(run.config) else []

    def card_lines(self, config) -> list[str]:
        knobs = config.knobs
        if not knobs.reselection_steps:
            return ["fixed support (no regrowth)"]
        return [f"regrowth every {knobs.reselection_steps} steps ({knobs.regrowth}), dropping "
                f"{knobs.initial_reselection_rate:g} of the support at first ({knobs.reselection_rate_policy} decay)"]


class Regrowth:
    """Drop-and-regrow of the unstructured supports, with its gradient or momentum statistics."""

    def __init__(self, run: Run, layers: dict):
        self.run, self.layers, self.knobs = run, layers, run.config.knobs
        self.momentum: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._armed: list = []
        if run.total:
            self._arm_probes(0)

    def _is_reselection(self, t: int) -> bool:
        a, r = self.knobs.accumulation_steps, self.knobs.reselection_steps
        return t >= a and (t - a) % r == 0 and t < self.run.total

    def _arm_probes(self, done: int) -> None:
        """Start gradient statistics if the update after `done` opens an accumulation window."""
        if self.knobs.regrowth != "gradient" or not self._is_reselection(done + self.knobs.accumulation_steps):
            return
        self._armed = attach_probes(
            self.layers, self.run.adapter, lambda layer: GradientProbe(layer.sparse_indices[self.run.adapter].numel())
        )

    def retire(self) -> None:
        detach_probes(self.layers, self.run.adapter, self._armed)

    def before_optimizer_step(self, t: int) -> dict:
        # the gradients, while every engine still holds them (DeepSpeed frees its partitions in the step)
        if self.knobs.regrowth == "momentum" and not self._optimizer_keeps_momentum():
            self._accumulate_momentum()
        return {}

    def after_optimizer_step(self, t: int) -> dict:
        stats = {}
        if self.knobs.regrowth == "momentum" and self._optimizer_keeps_momentum():
            self._accumulate_momentum()  # the optimizer's accumulators, with this step's update in them
        if self._is_reselection(t):
            stats = self._reselect(t)
        self._arm_probes(t)
        return stats

    def _optimizer_keeps_momentum(self) -> bool:
        return isinstance(unwrap_optimizer(self.run.optimizer), SparseSM3)

    @torch.no_grad()
    def _accumulate_momentum(self) -> None:
        """SM3-style cover accumulators: one per row and one per column, fed by active-slot gradients.

        Under `SparseSM3` the optimizer keeps exactly these: use its own rather than a second copy.
        """
        adapter = self.run.adapter
        optimizer = unwrap_optimizer(self.run.optimizer)
        if isinstance(optimizer, SparseSM3):
            for name, layer in self.layers.items():
                accumulators = optimizer.accumulators(layer.sparse_values[adapter])
                if accumulators is not None:
                    self.momentum[name] = accumulators
            return
        for name, layer in self.layers.items():
            grad = full_grad(layer.sparse_values[adapter])
            if grad is None:
                continue
            out_features, in_features = layer.delta_shape
            if name not in self.momentum:
                self.momentum[name] = (
                    torch.zeros(out_features, device=grad.device),
                    torch.zeros(in_features, device=grad.device),
                )
            row_acc, col_acc = self.momentum[name]
            sm3_accumulate(row_acc, col_acc, layer.sparse_indices[adapter], in_features, grad)

    @torch.no_grad()
    def _reselect(self, t: int) -> dict:
        knobs, adapter = self.knobs, self.run.adapter
        if t == knobs.accumulation_steps and knobs.regrowth == "gradient":
            fraction = 1.0
        else:
            fraction = drop_fraction(t, self.run.total, knobs.initial_reselection_rate, knobs.reselection_rate_policy)
        total_k = total_numel = dropped = regrown = 0
        for name, layer in self.layers.items():
            param, indices = layer.sparse_values[adapter], layer.sparse_indices[adapter]
            values = full(param)  # the whole tensor, also where FSDP2 shards it
            k = values.numel()
            out_features, in_features = layer.delta_shape
            total_k, total_numel = total_k + k, total_numel + out_features * in_features
            n_drop = int(k * fraction)
            probe = layer.sparse_probe.pop(adapter, None)
            if n_drop == 0:
                continue  # the same on every rank (same k and fraction), so no collective is skipped on one alone
            if knobs.regrowth == "gradient":
                if probe is None or probe.candidates is None:
                    continue  # this layer saw no backward in the window
                candidates, sums = gather_candidates(probe.candidates, probe.sums)
                scores = sums.abs()
            else:
                if name not in self.momentum:
                    continue
                row_acc, col_acc = self.momentum[name]
                # every active position is excluded, the ones being dropped too: regrowth goes elsewhere
                candidates, scores = top_positions(
                    lambda r0, r1: row_acc[r0:r1, None] * col_acc[None, :], out_features, in_features, n_drop, indices
                )
            result = regrow(indices, values, n_drop, candidates.to(indices.device), scores.to(values.device))
            keep = result.source >= 0
            moved = torch.zeros_like(values)
            moved[keep] = values[result.source[keep]]
            write_(param, moved)
            indices.copy_(result.indices.to(indices.dtype))
            layer.prepare_layout(adapter)
            remap_optimizer_state(self.run.optimizer, param, result.source)
            dropped += n_drop
            regrown += result.dropped  # as many new positions as old ones left
        return {
            "sparse/density": total_k / max(total_numel, 1),
            "sparse/drop_fraction": fraction,
            "sparse/dropped": dropped,
            "sparse/regrown": regrown,
            "sparse/churn": regrown / max(total_k, 1),
        }

    # -- checkpoints: everything a resumed run needs to continue exactly -----------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, (rows, cols) in self.momentum.items():
            state[f"momentum.{name}.rows"], state[f"momentum.{name}.cols"] = rows, cols
        for name, layer in self.layers.items():
            probe = layer.sparse_probe.get(self.run.adapter)
            if probe is not None:
                state[f"probe.{name}.size"] = torch.tensor([probe.n])
                if probe.candidates is not None:
                    state[f"probe.{name}.candidates"], state[f"probe.{name}.sums"] = probe.candidates, probe.sums
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], t: int) -> None:
        self.momentum = {}
        for name, layer in self.layers.items():
            layer.sparse_probe.pop(self.run.adapter, None)
            device = layer.sparse_values[self.run.adapter].device
            if f"momentum.{name}.rows" in state:
                self.momentum[name] = (state[f"momentum.{name}.rows"].to(device), state[f"momentum.{name}.cols"].to(device))
            if f"probe.{name}.size" in state:
                probe = GradientProbe(int(state[f"probe.{name}.size"][0]))
                if f"probe.{name}.candidates" in state:
                    probe.candidates = state[f"probe.{name}.candidates"].to(device)
                    probe.sums = state[f"probe.{name}.sums"].to(device)
                layer.sparse_probe[self.run.adapter] = probe
                self._armed.append(probe)
