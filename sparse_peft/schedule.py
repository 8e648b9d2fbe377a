"""What happens between optimizer steps: the runner of a method's per-step work.

A schedule belongs to the model, not to the user's memory. Every adapter whose method has work
between optimizer steps (`Method.has_steps`: SpIEL's regrowth, SaRA's penalty and progressive freeze,
GGPO's noise, ...) gets a `SparseScheduler` when it is created, and two global `torch.optim` step
hooks run it around each step of the optimizer that trains it: `before_optimizer_step()` when the
gradients are complete (and clipped), `step()` after the update, before the gradients are zeroed.
The HF and TRL trainers add `callbacks.SparseCallback` by themselves, which gives the schedule the
run's length and saves it with checkpoints. Calling the two methods by hand still works and never
runs a step twice. What the work is belongs to the method (`Method.steps`); this module only runs it.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch

from ._util import find_peft_model, unwrap_optimizer
from .full import check_engine, deepspeed_optimizer, is_deepspeed
from .methods import Run


# training forwards without the per-step work running before the watch says so (gradient accumulation
# runs several forwards per step; far fewer than this)
UNSTEPPED_FORWARDS = 512


def has_schedule(config) -> bool:
    """Whether an adapter's config asks for work between optimizer steps."""
    return getattr(config, "peft_type", None) == "SPARSE" and config.method_impl.has_steps(config)


class SparseScheduler:
    """What an adapter's method does between optimizer steps (its `Method.steps`).

    Args:
        model: the PEFT model (DDP / accelerate wrappers are looked through).
        optimizer: the optimizer that trains the adapter; per-element state follows the indices.
        total_steps: the number of optimizer steps of the run (SpIEL's drop fraction decays to 0 there).
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

    Under DeepSpeed, pass the engine (or its optimizer) as the optimizer: the work then runs inside every
    `engine.step()` that updates (after gradient accumulation), before DeepSpeed's own clipping:

        engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)
        SparseScheduler(engine, engine, total_steps=N)

    `before_optimizer_step()` (after backward and clipping) and `step()` (after the update) may still be
    called by hand: each optimizer step's work runs once either way. Both return statistics for
    logging (a dict) when there are any, else None; `last_stats` holds the whole last step's.
    """

    def __init__(
        self, model, optimizer=None, total_steps: Optional[int] = None, adapter_name: Optional[str] = None,
        *, _automatic: bool = False,
    ):
        model, layers = find_peft_model(model)
        self.adapter = adapter_name or model.active_adapter
        self.config = model.peft_config[self.adapter]
        self.optimizer = optimizer
        self.total = total_steps
        self.step_count = 0
        method = self.config.method_impl
        # what of the schedule needs the run's length when none is given: an error, now or at the first step
        need = method.run_length_needed(self.config) if not (total_steps and total_steps > 0) else ""
        self.missing_total = f"{need} (got total_steps={total_steps}): pass total_steps=N" if need else ""
        if self.missing_total and not _automatic:
            raise ValueError(self.missing_total)
        # each optimizer step's work runs once, whether the optimizer's hooks or the user call it
        self._before_done, self._before_stats = False, None
        self._after_unreported, self._after_stats = False, None
        self._retired = False
        self.last_stats: dict = {}
        adapter_layers = {n: m for n, m in layers.items() if self.adapter in m._all_available_adapter_names()}
        # the run the method's work sees; its optimizer is set when the first step binds it
        self.run = Run(self.adapter, self.config, adapter_layers, total_steps if not self.missing_total else None,
                       optimizer)
        if method.has_steps(self.config):
            check_engine(model)
        self.hooks = method.steps(self.run) if method.has_steps(self.config) else []  # may refuse: before anything changes
        # a trainable tensor of this adapter: an optimizer that holds it trains the adapter
        self._witness = next((m.get_delta(self.adapter).reference for m in adapter_layers.values()
                              if m.get_delta(self.adapter) is not None), None)
        zero = deepspeed_optimizer(optimizer) if self.hooks else None
        if zero is not None:
            _check_deepspeed(self)  # may refuse: before anything changes
        _register(model, self)  # replaces (retires) the adapter's previous scheduler
        # a watch for training that never reaches the schedule (an optimizer that is no torch.optim.Optimizer over
        # these tensors, e.g. a DeepSpeed engine in a plain loop, and nobody calling step()): say so, once
        self._forwards_since_step, self._watch = 0, None
        if self.hooks and adapter_layers:
            self._watch = next(iter(adapter_layers.values())).register_forward_pre_hook(self._count_forward)
        if zero is not None:
            _drive_deepspeed(zero)

    @property
    def optimizer(self):
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer) -> None:
        self._optimizer = optimizer
        if hasattr(self, "run"):
            self.run.optimizer = optimizer

    @property
    def layers(self) -> dict:
        """The adapter's sparse layers by name."""
        return self.run.layers

    @property
    def enabled(self) -> bool:
        return bool(self.hooks)

    def before_optimizer_step(self) -> Optional[dict]:
        """The work before an update (after backward and clipping). The optimizer's step hook calls it;
        a call by hand before `optimizer.step()` runs it there instead, once."""
        if self._retired:
            return None
        if self._after_unreported:
            # by hand after an update that ran its work by itself (DeepSpeed steps inside the Trainer's backward):
            # that step's statistics; the next step's work runs at its own step
            return self._before_stats
        return self._before_update()

    def _before_update(self) -> Optional[dict]:
        if self._retired:
            return None
        self._after_unreported = False  # a new optimizer step has begun
        self._refuse_without_total()
        if not self._before_done:
            stats = {}
            for hook in self.hooks:
                if hasattr(hook, "before_optimizer_step"):
                    stats.update(hook.before_optimizer_step(self.step_count + 1))
            self._before_done, self._before_stats = True, stats or None
        return self._before_stats

    def _refuse_without_total(self) -> None:
        if self.missing_total and self.enabled:
            raise RuntimeError(
                f"adapter {self.adapter!r}: {self.missing_total}. An optimizer step cannot know it: before training, "
                "create `sparse_peft.SparseScheduler(model, optimizer, total_steps=N)` (it then runs by itself at "
                "every optimizer.step()), or train with the HF / TRL Trainer, which does this for you."
            )

    def _count_forward(self, module, args) -> None:
        if not (module.training and torch.is_grad_enabled()) or self._retired:
            return
        self._forwards_since_step += 1
        if self._forwards_since_step == 1 and is_deepspeed(self._witness) and deepspeed_optimizer(self.optimizer) is None:
            raise RuntimeError(
                f"adapter {self.adapter!r} trains under DeepSpeed, whose engine steps no torch optimizer over the "
                "adapter's tensors, so its method's per-step work would never run: before training, create "
                "`sparse_peft.SparseScheduler(model, engine, total_steps=N)` with the engine deepspeed.initialize "
                "returned (it then runs inside every engine.step()), or train with the HF / TRL Trainer."
            )
        if self._forwards_since_step == UNSTEPPED_FORWARDS:
            warnings.warn(
                f"adapter {self.adapter!r}: {UNSTEPPED_FORWARDS} training forwards and its method's per-step work has "
                "not run once since the last: the optimizer is not a torch.optim.Optimizer over the adapter's tensors "
                "(e.g. a DeepSpeed engine), so its step hooks cannot run it. Call scheduler.before_optimizer_step() "
                "before and scheduler.step() after each optimizer step, or train with the HF / TRL Trainer.",
                stacklevel=2,
            )

    def _retire(self) -> None:
        """Another scheduler took over this adapter: stop, and leave it nothing of ours (probes)."""
        self._retired = True
        if self._watch is not None:
            self._watch.remove()
        for hook in self.hooks:
            if hasattr(hook, "retire"):
                hook.retire()

    # -- checkpoints: everything a resumed run needs to continue exactly -----------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"step_count": torch.tensor([self.step_count])}
        for hook in self.hooks:
            if hasattr(hook, "state_dict"):
                state.update(hook.state_dict())
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step_count = int(state["step_count"][0])
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
        self._forwards_since_step = 0
        self.last_stats = dict(before or {})  # the whole last step's statistics, before and after the update
        stats = {}
        for hook in self.hooks:
            if hasattr(hook, "after_optimizer_step"):
                stats.update(hook.after_optimizer_step(self.step_count))
        self.last_stats.update(stats)
        return stats or None


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
            bound = unwrap_optimizer(scheduler.optimizer)
            if bound is optimizer:
                found.append(scheduler)
            elif bind and (bound is None or not isinstance(bound, torch.optim.Optimizer)) and _trains(optimizer, scheduler._witness):
                # made with the adapter, before any wrapping: the engine that now holds the model is checked here
                check_engine(next(iter(scheduler.layers.values())))
                scheduler.optimizer = optimizer  # its state now follows the indices too
                found.append(scheduler)
    return found


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    if _SCHEDULES:
        for scheduler in _schedulers_of(optimizer, bind=True):
            scheduler._before_update()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    if _SCHEDULES:
        for scheduler in _schedulers_of(optimizer, bind=False):
            if not scheduler._retired:
                scheduler._after_stats, scheduler._after_unreported = scheduler._after_update(), True


def _check_deepspeed(scheduler: SparseScheduler) -> None:
    if scheduler._witness is not None and scheduler._witness.dtype == torch.float16:
        raise ValueError(
            f"adapter {scheduler.adapter!r}: DeepSpeed's fp16 loss scaling skips optimizer steps on overflow after "
            "the per-step work has seen the step's (overflowed) gradients; train in bf16 (\"bf16\": {\"enabled\": true})"
        )


def _drive_deepspeed(zero) -> None:
    """Run the schedules bound to a DeepSpeed ZeRO optimizer around its step (engine.step() calls it once per
    optimizer step, after gradient accumulation; its own torch optimizer steps flat partitions, which no
    adapter tensor is). The work before the update sees the reduced gradients before DeepSpeed clips them."""
    if getattr(zero, "_sparse_peft_step", None) is not None:
        return
    original = zero.step

    def step(*args, **kwargs):
        _before_optimizer_step(zero, args, kwargs)
        result = original(*args, **kwargs)
        _after_optimizer_step(zero, args, kwargs)
        return result

    zero._sparse_peft_step = original
    zero.step = step


def install_optimizer_hooks() -> None:
    """Register the two global optimizer step hooks, once per process (re-imports replace them)."""
    from torch.optim import optimizer as optim_module

    for handle in getattr(optim_module, "_sparse_peft_hooks", ()):
        handle.remove()
    optim_module._sparse_peft_hooks = (
        optim_module.register_optimizer_step_pre_hook(_before_optimizer_step),
        optim_module.register_optimizer_step_post_hook(_after_optimizer_step),
    )
