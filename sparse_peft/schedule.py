"""What happens between optimizer steps: the drop-and-regrow of unstructured supports (SpIEL), and
the per-step work of hooks.py (SaRA's penalty and progressive freeze, GGPO's noise).

A schedule belongs to the model, not to the user's memory. Every adapter with one gets a
`SparseScheduler` when it is created, and two global `torch.optim` step hooks run it around each
step of the optimizer that trains it: `before_optimizer_step()` when the gradients are complete
(and clipped), `step()` after the update, before the gradients are zeroed. The HF and TRL trainers
add `callbacks.SparseCallback` by themselves, which gives the schedule the run's length and saves
it with checkpoints. Calling the two methods by hand still works and never runs a step twice.

A step counts updates, keeps the regrowth statistics, and at each reselection rewrites every
layer's indices and values in place (same tensors, same size, so the optimizer keeps its
references) and moves the optimizer's per-element state with them.

Timeline, with R = reselection_steps and A = accumulation_steps, t counting updates from 1:
reselections happen after updates A, A + R, A + 2R, ... before the last; each one looks at the A
updates before it. The first one, for gradient regrowth, replaces the whole random start (the
paper's choice); later ones drop a fraction that decays to 0 at the last update.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import ops


def drop_fraction(step: int, total: int, initial_rate: float, policy: str) -> float:
    progress = min(step / total, 1.0)
    if policy == "linear":
        return initial_rate * (1.0 - progress)
    return initial_rate * (1.0 + math.cos(math.pi * progress)) / 2.0


def top_positions(
    block_scores: Callable[[int, int], torch.Tensor],
    out_features: int,
    in_features: int,
    n: int,
    exclude: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The n flat positions of an (out × in) score matrix with the largest |score|, and their scores.

    The matrix is never whole: `block_scores(r0, r1)` gives rows r0:r1, and a running top-n is
    kept across blocks. Positions in `exclude` (sorted flat indices) never qualify.
    Returns positions sorted ascending, with their signed scores.
    """
    step = max(1, ops._BLOCK_ELEMENTS // in_features)
    best_pos = torch.empty(0, dtype=torch.long)
    best_val = torch.empty(0)
    for r0 in range(0, out_features, step):
        r1 = min(r0 + step, out_features)
        block = block_scores(r0, r1).reshape(-1).float()
        key = block.abs()
        if exclude is not None and exclude.numel():
            lo, hi = torch.searchsorted(exclude.long(), torch.tensor([r0 * in_features, r1 * in_features])).tolist()
            key[exclude[lo:hi].long() - r0 * in_features] = -math.inf
        take = min(n, key.numel())
        top = torch.topk(key, take).indices
        keep = key[top] > -math.inf
        best_pos = torch.cat([best_pos.to(top.device), top[keep] + r0 * in_features])
        best_val = torch.cat([best_val.to(block.device), block[top[keep]]])
        if best_pos.numel() > n:
            top = torch.topk(best_val.abs(), n).indices
            best_pos, best_val = best_pos[top], best_val[top]
    order = best_pos.argsort()
    return best_pos[order], best_val[order]


@dataclass
class Regrowth:
    indices: torch.Tensor  # the new support, sorted, int64
    source: torch.Tensor  # for each new slot, the old slot whose value and state it keeps, or -1
    dropped: int  # old positions no longer in the support (equal to the new ones grown)


def regrow(indices: torch.Tensor, values: torch.Tensor, n_drop: int, candidates: torch.Tensor, scores: torch.Tensor) -> Regrowth:
    """Drop the n_drop slots of smallest |value|; grow the best-scoring candidates not kept.

    A dropped position that is chosen again keeps its value and optimizer state. If fewer than
    n_drop candidates qualify, the dropped slots of largest |value| stay, so the size of the
    support never changes.
    """
    k = indices.numel()
    positions = indices.long()
    order = torch.argsort(values.detach().abs(), stable=True)  # smallest |value| first
    outgoing, kept = order[:n_drop], order[n_drop:]
    eligible = ~torch.isin(candidates, positions[kept])
    candidates, scores = candidates[eligible], scores[eligible]
    take = min(n_drop, candidates.numel())
    chosen = candidates[torch.topk(scores, take).indices] if take else candidates[:0]
    if take < n_drop:
        refill = outgoing.flip(0)  # largest |value| first
        refill = refill[~torch.isin(positions[refill], chosen)][: n_drop - take]
        kept = torch.cat([kept, refill])
    new = torch.cat([positions[kept], chosen]).sort().values
    slot = torch.searchsorted(positions, new).clamp_(max=k - 1)
    source = torch.where(positions[slot] == new, slot, torch.full_like(slot, -1))
    return Regrowth(new, source, int((source < 0).sum()))


class GradientProbe:
    """The weight gradient of one layer at candidate positions, summed over an accumulation window.

    Called from `ops.SparseLinear`'s backward with (dy, x). The first call builds the dense
    gradient one block of rows at a time and keeps the n positions of largest |g| as the
    candidates; later calls add the gradient at those candidates only. Memory: O(n).
    """

    def __init__(self, n_candidates: int):
        self.n = n_candidates
        self.candidates: Optional[torch.Tensor] = None
        self.sums: Optional[torch.Tensor] = None

    def __call__(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        if self.candidates is None:
            out_features, in_features = dy.shape[1], x.shape[1]
            x32, dy32 = x.float(), dy.float()
            self.candidates, self.sums = top_positions(
                lambda r0, r1: dy32[:, r0:r1].t() @ x32, out_features, in_features, self.n
            )
        else:
            self.sums += ops.grad_at(dy, x, self.candidates, torch.float32)


def _gather_candidates(candidates: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool every rank's candidates and sums, so that every rank computes the same selection."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return candidates, sums
    world = dist.get_world_size()
    size = torch.tensor([candidates.numel()], device=sums.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    # all_gather needs one length: pad with position -1, dropped again below
    pos = torch.full((longest,), -1, dtype=torch.long, device=sums.device)
    val = torch.zeros(longest, dtype=torch.float32, device=sums.device)
    pos[: candidates.numel()], val[: sums.numel()] = candidates, sums
    all_pos = [torch.empty_like(pos) for _ in range(world)]
    all_val = [torch.empty_like(val) for _ in range(world)]
    dist.all_gather(all_pos, pos)
    dist.all_gather(all_val, val)
    pos, val = torch.cat(all_pos), torch.cat(all_val)
    real = pos >= 0
    unique, inverse = torch.unique(pos[real], return_inverse=True)
    return unique, torch.zeros(unique.numel(), device=val.device).index_add_(0, inverse, val[real])


def _unwrap_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer and similar wrappers keep the real one in `.optimizer`
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def remap_optimizer_state(optimizer, param: torch.Tensor, source: torch.Tensor) -> None:
    """Move per-element optimizer state with the slots it belongs to.

    New slots start with zero state, except Adam's second moment (`exp_avg_sq`, `max_exp_avg_sq`):
    it takes the mean over the kept slots. The step count is shared by the whole tensor, so Adam's
    bias correction has long faded; with a zero second moment a new entry's first updates would be
    ~3x the usual size (lr·(1-β1)/sqrt(1-β2)), with a typical one they are of typical size.
    """
    optimizer = _unwrap_optimizer(optimizer)
    state = optimizer.state.get(param) if optimizer is not None else None
    if not state:
        return
    keep = source >= 0
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == param.shape:
            moved = torch.zeros_like(value)
            moved[keep] = value[source[keep]]
            if "exp_avg_sq" in key and bool(keep.any()):
                moved[~keep] = value[source[keep]].mean()
            value.copy_(moved)


def _find(model):
    """The PEFT model behind DDP / accelerate wrappers, and its sparse layers."""
    from .layer import SparseLayer

    while not hasattr(model, "peft_config") and hasattr(model, "module"):
        model = model.module
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SparseLayer)}
    return model, layers


def has_schedule(config) -> bool:
    """Whether an adapter's config asks for work between optimizer steps."""
    return bool(
        getattr(config, "reselection_steps", 0)
        or getattr(config, "nuclear_norm_weight", 0)
        or getattr(config, "progressive_step", None) is not None
        or getattr(config, "perturbation", "none") != "none"
    )


class SparseScheduler:
    """What an adapter's method does between optimizer steps: SpIEL's drop-and-regrow, SaRA's
    nuclear-norm subgradient and progressive freeze, LoRA-GGPO's noise refresh (see hooks.py).

    Args:
        model: the PEFT model (DDP / accelerate wrappers are looked through).
        optimizer: the optimizer that trains the adapter; its per-element state follows the indices.
        total_steps: the number of optimizer steps of the run (the drop fraction decays to 0 there).
        adapter_name: defaults to the model's active adapter.

    Each adapter with a schedule already has one (made with the adapter, without the run's length),
    and the HF / TRL trainers make theirs. In a hand-written loop, create one before training when the
    schedule needs the run's length (SpIEL's regrowth, a fractional `progressive_step`); it replaces
    the adapter's own and runs itself at every `optimizer.step()`:

        scheduler = SparseScheduler(model, optimizer, total_steps=N)
        for batch in data:
            model(**batch).loss.backward(); clip_grad_norm_(...)
            optimizer.step()                       # runs before_optimizer_step() and step() around itself
            optimizer.zero_grad()

    `before_optimizer_step()` (after backward and clipping) and `step()` (after the update) may still be
    called by hand, e.g. where the optimizer is not a `torch.optim.Optimizer` over the adapter's own
    tensors (DeepSpeed): each optimizer step's work runs once either way. Both return statistics for
    logging (a dict) when there are any, else None.
    """

    def __init__(
        self, model, optimizer=None, total_steps: Optional[int] = None, adapter_name: Optional[str] = None,
        *, _automatic: bool = False,
    ):
        model, layers = _find(model)
        self.adapter = adapter_name or model.active_adapter
        self.config = model.peft_config[self.adapter]
        self.optimizer = optimizer
        self.total = total_steps
        self.step_count = 0
        self.layers = {n: m for n, m in layers.items() if self.adapter in m.sparse_values}
        self.momentum: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.regrowth = getattr(self.config, "reselection_steps", 0) > 0 and bool(self.layers)
        # what of the schedule needs the run's length when none is given: an error, now or at the first step
        self.missing_total = self._missing_total()
        if self.missing_total and not _automatic:
            raise ValueError(self.missing_total)
        # each optimizer step's work runs once, whether the optimizer's hooks or the user call it
        self._before_done, self._before_stats = False, None
        self._after_unreported, self._after_stats = False, None
        self._retired = False
        self.last_stats: dict = {}
        self.hooks = self._build_hooks(layers)  # may refuse (GGPO on a quantized layer): before anything changes
        _register(model, self)  # replaces (retires) the adapter's previous scheduler
        if self.regrowth and not self.missing_total:
            self._arm_probes()
        # a trainable tensor of this adapter: an optimizer that holds it trains the adapter
        self._witness = next((m.get_delta(self.adapter).reference for m in layers.values()
                              if m.get_delta(self.adapter) is not None), None)

    def _missing_total(self) -> str:
        if self.total is not None and self.total > 0:
            return ""
        at = getattr(self.config, "progressive_step", None)
        if self.regrowth:
            return (f"the regrowth schedule needs the run's total number of optimizer steps (got total_steps="
                    f"{self.total}): pass total_steps=N")
        if isinstance(at, float) and at < 1:
            return (f"progressive_step={at} as a fraction of the run needs the run's total number of optimizer steps "
                    f"(got total_steps={self.total}): pass total_steps=N, or give progressive_step as a step number")
        return ""

    def _build_hooks(self, layers) -> list:
        from .hooks import NuclearNorm, Perturbation, Progressive

        config, hooks = self.config, []
        adapter_layers = {n: m for n, m in layers.items() if self.adapter in m._all_available_adapter_names()}
        if getattr(config, "nuclear_norm_weight", 0):
            hooks.append(NuclearNorm(adapter_layers, self.adapter, config.nuclear_norm_weight,
                                     config.nuclear_norm_layers, config.nuclear_norm_rank))
        if getattr(config, "progressive_step", None) is not None and not self.missing_total:
            at = config.progressive_step
            if isinstance(at, float) and at < 1:
                at = max(1, round(at * self.total))
            hooks.append(Progressive(adapter_layers, self.adapter, int(at), config.threshold, self.optimizer))
        if getattr(config, "perturbation", "none") == "ggpo":
            hooks.append(Perturbation(adapter_layers, self.adapter, config.perturbation_sigma,
                                      config.perturbation_beta, config.seed))
        return hooks

    @property
    def enabled(self) -> bool:
        return self.regrowth or bool(self.hooks)

    def before_optimizer_step(self) -> Optional[dict]:
        """The work before an update (after backward and clipping). The optimizer's step hook calls it;
        a call by hand before `optimizer.step()` runs it there instead, once."""
        if self._retired:
            return None
        self._refuse_without_total()
        if not self._before_done:
            stats = {}
            for hook in self.hooks:
                if hasattr(hook, "before_optimizer_step"):
                    stats.update(hook.before_optimizer_step(self.step_count + 1))
            self._before_done, self._before_stats = True, stats or None
        return self._before_stats

    def _refuse_without_total(self) -> None:
        if self.missing_total:
            raise RuntimeError(
                f"adapter {self.adapter!r}: {self.missing_total}. An optimizer step cannot know it: before training, "
                "create `sparse_peft.SparseScheduler(model, optimizer, total_steps=N)` (it then runs by itself at "
                "every optimizer.step()), or train with the HF / TRL Trainer, which does this for you."
            )

    def _retire(self) -> None:
        """Another scheduler took over this adapter: stop, and leave it no probe of ours."""
        self._retired = True
        for layer in self.layers.values():
            layer.sparse_probe.pop(self.adapter, None)

    def _is_reselection(self, t: int) -> bool:
        a, r = self.config.accumulation_steps, self.config.reselection_steps
        return t >= a and (t - a) % r == 0 and t < self.total

    def _arm_probes(self) -> None:
        """Start gradient statistics if the next update opens an accumulation window."""
        if self.config.regrowth != "gradient" or not self._is_reselection(self.step_count + self.config.accumulation_steps):
            return
        for layer in self.layers.values():
            layer.sparse_probe[self.adapter] = GradientProbe(layer.sparse_values[self.adapter].numel())

    @torch.no_grad()
    def _accumulate_momentum(self) -> None:
        """SM3-style cover accumulators: one per row and one per column, fed by active-slot gradients.

        Under `SparseSM3` the optimizer keeps exactly these: use its own rather than a second copy.
        """
        from .optim import SparseSM3, sm3_accumulate

        optimizer = _unwrap_optimizer(self.optimizer)
        if isinstance(optimizer, SparseSM3):
            for name, layer in self.layers.items():
                accumulators = optimizer.accumulators(layer.sparse_values[self.adapter])
                if accumulators is not None:
                    self.momentum[name] = accumulators
            return
        for name, layer in self.layers.items():
            values = layer.sparse_values[self.adapter]
            if values.grad is None:
                continue
            out_features, in_features = layer.delta_shape
            if name not in self.momentum:
                self.momentum[name] = (
                    torch.zeros(out_features, device=values.device),
                    torch.zeros(in_features, device=values.device),
                )
            row_acc, col_acc = self.momentum[name]
            sm3_accumulate(row_acc, col_acc, layer.sparse_indices[self.adapter], in_features, values.grad)

    # -- checkpoints: everything a resumed run needs to continue exactly -----------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"step_count": torch.tensor([self.step_count])}
        for name, (rows, cols) in self.momentum.items():
            state[f"momentum.{name}.rows"], state[f"momentum.{name}.cols"] = rows, cols
        for name, layer in self.layers.items():
            probe = layer.sparse_probe.get(self.adapter)
            if probe is not None:
                state[f"probe.{name}.size"] = torch.tensor([probe.n])
                if probe.candidates is not None:
                    state[f"probe.{name}.candidates"], state[f"probe.{name}.sums"] = probe.candidates, probe.sums
        for hook in self.hooks:
            if hasattr(hook, "state_dict"):
                state.update(hook.state_dict())
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step_count = int(state["step_count"][0])
        self.momentum = {}
        for name, layer in self.layers.items():
            layer.sparse_probe.pop(self.adapter, None)
            device = layer.sparse_values[self.adapter].device
            if f"momentum.{name}.rows" in state:
                self.momentum[name] = (state[f"momentum.{name}.rows"].to(device), state[f"momentum.{name}.cols"].to(device))
            if f"probe.{name}.size" in state:
                probe = GradientProbe(int(state[f"probe.{name}.size"][0]))
                if f"probe.{name}.candidates" in state:
                    probe.candidates = state[f"probe.{name}.candidates"].to(device)
                    probe.sums = state[f"probe.{name}.sums"].to(device)
                layer.sparse_probe[self.adapter] = probe
        for hook in self.hooks:
            if hasattr(hook, "load_state_dict"):
                hook.load_state_dict(state, self.step_count)

    def step(self) -> Optional[dict]:
        """The work after an update, before the gradients are zeroed. The optimizer's step hook calls it;
        a call by hand after `optimizer.step()` returns what that step's hook did."""
        if self._retired:
            return None
        if self._after_unreported:
            self._after_unreported = False
            return self._after_stats
        return self._after_update()

    def _after_update(self) -> Optional[dict]:
        before, self._before_done = self._before_stats if self._before_done else None, False
        if not self.enabled:
            return None
        self._refuse_without_total()
        self.step_count += 1
        self.last_stats = dict(before or {})  # the whole last step's statistics, before and after the update
        stats = {}
        if self.regrowth:
            if self.config.regrowth == "momentum":
                self._accumulate_momentum()
            if self._is_reselection(self.step_count):
                stats.update(self._reselect())
            self._arm_probes()
        for hook in self.hooks:
            if hasattr(hook, "after_optimizer_step"):
                stats.update(hook.after_optimizer_step(self.step_count))
        self.last_stats.update(stats)
        return stats or None

    @torch.no_grad()
    def _reselect(self) -> dict:
        t, config = self.step_count, self.config
        first = t == config.accumulation_steps
        if first and config.regrowth == "gradient":
            fraction = 1.0
        else:
            fraction = drop_fraction(t, self.total, config.initial_reselection_rate, config.reselection_rate_policy)
        total_k = total_numel = dropped = regrown = 0
        for name, layer in self.layers.items():
            values, indices = layer.sparse_values[self.adapter], layer.sparse_indices[self.adapter]
            k = values.numel()
            out_features, in_features = layer.delta_shape
            total_k, total_numel = total_k + k, total_numel + out_features * in_features
            n_drop = int(k * fraction)
            probe = layer.sparse_probe.pop(self.adapter, None)
            if n_drop == 0:
                continue  # the same on every rank (same k and fraction), so no collective is skipped on one alone
            if config.regrowth == "gradient":
                if probe is None or probe.candidates is None:
                    continue  # this layer saw no backward in the window
                candidates, sums = _gather_candidates(probe.candidates, probe.sums)
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
            values.copy_(moved)
            indices.copy_(result.indices.to(indices.dtype))
            remap_optimizer_state(self.optimizer, values, result.source)
            dropped += n_drop
            regrown += result.dropped  # as many new positions as old ones left
        return {
            "sparse/density": total_k / max(total_numel, 1),
            "sparse/drop_fraction": fraction,
            "sparse/dropped": dropped,
            "sparse/regrown": regrown,
            "sparse/churn": regrown / max(total_k, 1),
        }


# -- schedules run by the optimizer ---------------------------------------------------------------------
# tuner (weakly) -> {adapter name: its SparseScheduler}. The model's own reference to a scheduler is
# here, not in the module tree, so deepcopy and state_dict never see it.
_SCHEDULES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _register(model, scheduler: SparseScheduler) -> None:
    tuner = getattr(model, "base_model", None) if hasattr(model, "get_base_model") else model
    tuner = tuner if tuner is not None else model
    by_adapter = _SCHEDULES.setdefault(tuner, {})
    previous = by_adapter.get(scheduler.adapter)
    if previous is not None and previous is not scheduler:
        previous._retire()
    by_adapter[scheduler.adapter] = scheduler


def forget(model, adapter_name: str) -> None:
    """The adapter was deleted: its scheduler stops."""
    for tuner in (model, getattr(model, "base_model", None)):
        if tuner is not None and tuner in _SCHEDULES:
            scheduler = _SCHEDULES[tuner].pop(adapter_name, None)
            if scheduler is not None:
                scheduler._retire()


def attach_automatic(model, adapter_name: str) -> None:
    """Give a new trainable adapter with a schedule its scheduler (the run's length unknown yet)."""
    config = model.peft_config[adapter_name]
    if has_schedule(config) and not getattr(config, "inference_mode", False):
        SparseScheduler(model, None, None, adapter_name, _automatic=True)


_PARAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> (param count, ids)


def _trains(optimizer, tensor) -> bool:
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    cached = _PARAMS.get(optimizer)
    if cached is None or cached[0] != count:
        cached = _PARAMS[optimizer] = (count, {id(p) for group in optimizer.param_groups for p in group["params"]})
    return id(tensor) in cached[1]


def _schedulers_of(optimizer, bind: bool) -> list:
    """The live schedulers this optimizer's step drives; with `bind`, adopt those of adapters it trains."""
    found = []
    for by_adapter in list(_SCHEDULES.values()):
        for scheduler in list(by_adapter.values()):
            if not scheduler.enabled or scheduler._witness is None:
                continue
            bound = _unwrap_optimizer(scheduler.optimizer)
            if bound is optimizer:
                found.append(scheduler)
            elif bind and (bound is None or not isinstance(bound, torch.optim.Optimizer)) and _trains(optimizer, scheduler._witness):
                scheduler.optimizer = optimizer  # its state now follows the indices too
                for hook in scheduler.hooks:
                    if hasattr(hook, "optimizer"):
                        hook.optimizer = optimizer
                found.append(scheduler)
    return found


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    if _SCHEDULES:
        for scheduler in _schedulers_of(optimizer, bind=True):
            scheduler.before_optimizer_step()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    if _SCHEDULES:
        for scheduler in _schedulers_of(optimizer, bind=False):
            if not scheduler._retired:
                scheduler._after_stats, scheduler._after_unreported = scheduler._after_update(), True


def install_optimizer_hooks() -> None:
    """Register the two global optimizer step hooks, once per process (re-imports replace them)."""
    from torch.optim import optimizer as optim_module

    for handle in getattr(optim_module, "_sparse_peft_hooks", ()):
        handle.remove()
    optim_module._sparse_peft_hooks = (
        optim_module.register_optimizer_step_pre_hook(_before_optimizer_step),
        optim_module.register_optimizer_step_post_hook(_after_optimizer_step),
    )
