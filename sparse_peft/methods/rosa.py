"""RoSA (Nikdan et al., ICML 2024): robust adaptation, a LoRA plus a sparse part whose support comes from
the accumulated gradient of each weight.

The paper picks each layer's mask as the top-k of the squared gradients summed over its first
samples, then trains both parts. Its reference code needs two runs (pick the mask, restart) and
keeps dense fp32 gradients of every layer in host memory; here it is one run:

- warm-up (the first `warmup_steps` optimizer steps): only the LoRA trains. The sparse part sits on
  a placeholder support with zero values and gets no update (its gradients are dropped before each
  step); every adapted layer keeps Σ g² for a pool of `pool` × k positions, streamed block by block
  (regrowth.SquaredGradientPool: a pool, never a dense accumulator);
- after update `warmup_steps`: each layer's support becomes the top-k of its pool, once (summed over
  data-parallel ranks, so every rank chooses the same); the values start at zero with fresh
  optimizer state, and both parts train from then on.

Default targets ("all-linear"): the paper adapts every linear layer of the transformer blocks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..full import drop_grad, is_deepspeed, write_
from ..regrowth import SquaredGradientPool, attach_probes, detach_probes, gather_candidates, remap_optimizer_state
from ._base import Method, Run


@dataclass
class RosaKnobs:
    warmup_steps: int = field(default=20, metadata={
        "help": "Optimizer steps over which each weight's squared gradients are accumulated before the sparse "
        "mask is chosen, once; only the low-rank part trains until then."})
    pool: float = field(default=4.0, metadata={
        "help": "Candidates kept per layer during the warm-up, as a multiple of the layer's mask size k (a streaming "
        "top-k of the accumulated statistic: memory pool × k entries per layer, no dense accumulator)."})


class Rosa(Method):
    title = "RoSA: robust adaptation (low-rank plus gradient-chosen sparse)"
    paper = "https://arxiv.org/abs/2401.04679"
    # the paper's LLaMA-2 runs: r = 16 with a 0.6 % sparse part; here half of LoRA-8's budget each at parity
    defaults = dict(structure="unstructured", selection="random", density=0.006, r=16, lora_alpha=16)
    Knobs = RosaKnobs

    def check(self, config) -> None:
        k = config.knobs
        if not isinstance(k.warmup_steps, int) or k.warmup_steps < 1:
            raise ValueError(f"warmup_steps={k.warmup_steps!r} must be an integer >= 1 (optimizer steps of statistics)")
        if not k.pool >= 1:
            raise ValueError(f"pool={k.pool!r} must be >= 1 (candidates per mask entry)")
        if config.structure != "unstructured":
            raise ValueError(f"RoSA chooses single entries: structure must be 'unstructured', not {config.structure!r}")
        if not config.store_indices:
            raise ValueError("RoSA's mask comes from gradients, not from the seed: store_indices must stay True")

    def has_steps(self, config) -> bool:
        return True

    def steps(self, run: Run) -> list:
        layers = {n: m for n, m in run.layers.items() if run.adapter in m.sparse_values}
        return [GradientMask(run, layers)] if layers else []

    def card_lines(self, config) -> list[str]:
        return [f"sparse mask: top-k of Σ g² over the first {config.knobs.warmup_steps} optimizer steps (LoRA alone "
                "until then)"]


class GradientMask:
    """The warm-up: statistics in, sparse gradients out; then the one-shot choice of every mask."""

    def __init__(self, run: Run, layers: dict):
        self.run, self.layers = run, layers
        self.warmup, self.pool = run.config.knobs.warmup_steps, run.config.knobs.pool
        self.chosen = False
        if run.total is not None and run.total < self.warmup:
            raise ValueError(
                f"the run has {run.total} optimizer steps, fewer than RoSA's warmup_steps={self.warmup}: its mask "
                "would never be chosen (the sparse part would stay an untrained placeholder); lower warmup_steps"
            )
        # trained without the run's length (a plain loop that made no SparseScheduler): say at the first step
        # what happens to a run shorter than the warm-up; trainers give the length and hear nothing
        self._warn_unknown_length = run.total is None
        self._arm()

    def _arm(self) -> None:
        def pool(layer):
            k = layer.sparse_indices[self.run.adapter].numel()
            return SquaredGradientPool(max(k, round(self.pool * k)))

        self._armed = attach_probes(self.layers, self.run.adapter, pool)

    def retire(self) -> None:
        detach_probes(self.layers, self.run.adapter, self._armed)

    def before_optimizer_step(self, t: int) -> dict:
        if self._warn_unknown_length:
            self._warn_unknown_length = False
            warnings.warn(
                f"RoSA chooses its sparse mask after {self.warmup} optimizer steps (warmup_steps); until then only "
                "the low-rank part trains, and a run that stops earlier keeps a placeholder support with zero values. "
                "Give the run's length (SparseScheduler(model, optimizer, total_steps=N)) to have a short run refused.",
                stacklevel=2,
            )
        if t <= self.warmup:
            for layer in self.layers.values():  # the placeholder support does not train
                drop_grad(layer.sparse_values[self.run.adapter])
        return {}

    @torch.no_grad()
    def after_optimizer_step(self, t: int) -> dict:
        if t != self.warmup:
            return {}
        adapter, total_k, found = self.run.adapter, 0, 0
        for layer in self.layers.values():
            values, indices = layer.sparse_values[adapter], layer.sparse_indices[adapter]
            probe = layer.sparse_probe.pop(adapter, None)
            k = indices.numel()  # not the values: ZeRO-3 leaves them empty outside forward
            total_k += k
            if probe is None or probe.candidates is None:
                continue  # no backward reached this layer in the warm-up: its placeholder stays (counted below)
            candidates, sums = gather_candidates(probe.candidates, probe.sums)
            top = torch.topk(sums, min(k, sums.numel())).indices
            chosen = candidates[top].long().sort().values
            if chosen.numel() < k:  # fewer candidates than slots (a tiny layer): keep placeholders for the rest
                rest = indices.long()[~torch.isin(indices.long(), chosen)][: k - chosen.numel()]
                chosen = torch.cat([chosen, rest]).sort().values
            indices.copy_(chosen.to(indices.dtype))
            layer.prepare_layout(adapter)
            write_(values, torch.zeros(k, dtype=values.dtype, device=indices.device))
            remap_optimizer_state(self.run.optimizer, values, torch.full_like(indices, -1, dtype=torch.long))
            found += 1
        self.chosen = True
        if any(is_deepspeed(layer.sparse_values[adapter]) for layer in self.layers.values()):
            warnings.warn(
                "RoSA under DeepSpeed: the sparse part starts training now, but DeepSpeed's optimizer steps all of a "
                f"parameter group together, so its Adam bias correction counts from step 1, not from step {t + 1} as "
                "with a torch optimizer: its first updates are smaller (about 0.6x after a 3-step warm-up, fading "
                "within ~1/(1-beta2) steps). The mask itself is the same.", stacklevel=2)
        if found < len(self.layers):
            warnings.warn(f"RoSA: {len(self.layers) - found} of {len(self.layers)} layers saw no gradient in the "
                          "warm-up and keep their placeholder support", stacklevel=2)
        return {"sparse/mask_chosen_layers": found, "sparse/mask_entries": total_k}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, layer in self.layers.items():
            probe = layer.sparse_probe.get(self.run.adapter)
            if isinstance(probe, SquaredGradientPool):
                state[f"pool.{name}.size"] = torch.tensor([probe.n])
                if probe.candidates is not None:
                    state[f"pool.{name}.candidates"], state[f"pool.{name}.sums"] = probe.candidates, probe.sums
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], t: int) -> None:
        self.chosen = t >= self.warmup
        for name, layer in self.layers.items():
            layer.sparse_probe.pop(self.run.adapter, None)
            if self.chosen or f"pool.{name}.size" not in state:
                continue
            probe = SquaredGradientPool(int(state[f"pool.{name}.size"][0]))
            if f"pool.{name}.candidates" in state:
                device = layer.sparse_values[self.run.adapter].device
                probe.candidates = state[f"pool.{name}.candidates"].to(device)
                probe.sums = state[f"pool.{name}.sums"].to(device)
            layer.sparse_probe[self.run.adapter] = probe
            self._armed.append(probe)
