"""The sparse schedules inside any Hugging Face or TRL trainer, as one TrainerCallback.

Importing sparse_peft adds `SparseCallback` to every Trainer's default callbacks (transformers'
`DEFAULT_CALLBACKS`, which TRL's trainers share), so nothing needs attaching:

    trainer = SFTTrainer(..., peft_config=SparseConfig(method="spiel"))   # regrowth runs

At `on_train_begin` (the optimizer exists then) it makes the adapter's `SparseScheduler` with the
run's length; the optimizer's step hooks run it (schedule.py), or the trainer's own pre- and
post-optimizer-step events where those come first. Under DeepSpeed, which steps inside the
backward call, the scheduler runs inside the ZeRO optimizer's step instead (and a ZeRO-3 run
that would save an empty adapter is refused at the start). It saves the schedule's state with every checkpoint, restores it on
resume, and adds its statistics (`sparse/density`, `sparse/churn`, `sparse/nuclear_norm`,
`sparse/perturbation_std`, ...) to the next log, so that W&B, TensorBoard and
`trainer.state.log_history` show them. It does nothing for a model without a scheduled sparse adapter.
"""

from __future__ import annotations

import os
import warnings

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from ._util import find_peft_model
from .full import check_engine
from .schedule import SparseScheduler, has_schedule


STATE_FILE = "sparse_scheduler.safetensors"


class SparseCallback(TrainerCallback):
    def __init__(self):
        self.scheduler = None
        self._pending: dict = {}

    @classmethod
    def attach(cls, trainer) -> "SparseCallback":
        """The trainer's SparseCallback. Every Trainer has one already (importing sparse_peft adds it to
        the default callbacks, ahead of the reporting integrations): this returns it, or adds one first
        in the list for a trainer made before the import. Never a second one."""
        existing = next((c for c in trainer.callback_handler.callbacks if isinstance(c, SparseCallback)), None)
        if existing is not None:
            return existing
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        peft_model, layers = find_peft_model(model)
        if layers:
            _check_zero3_saving()
            check_engine(peft_model)
        config = getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", None))
        if not has_schedule(config):
            self.scheduler = None  # nothing between steps: a LoRA, a static sparse adapter, no adapter at all
            return
        # a second SparseCallback in the same trainer (one passed in `callbacks=` beside the default)
        # makes its own scheduler, which retires this one's: the work still runs once per step
        self.scheduler = SparseScheduler(model, optimizer, total_steps=state.max_steps)
        if state.global_step and self.scheduler.enabled:
            # a resumed run: the Trainer has restored the adapter and the optimizer; restore the schedule
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.isfile(path):
                self.scheduler.load_state_dict(load_file(path))
            else:
                warnings.warn(f"no {STATE_FILE} beside the checkpoint of step {state.global_step} (it was saved "
                              "without sparse_peft's callback, or the file was removed): the schedule's statistics "
                              "restart empty from that step", stacklevel=2)
                self.scheduler.step_count = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if self.scheduler is not None and self.scheduler.enabled and not self.scheduler._retired:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                save_file(self.scheduler.state_dict(), os.path.join(folder, STATE_FILE))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # after the gradients are complete and clipped: SaRA's penalty gradient, GGPO's next noise scale
        stats = self.scheduler.before_optimizer_step() if self.scheduler is not None else None
        if stats:
            self._pending.update(stats)

    def on_optimizer_step(self, args, state, control, **kwargs):
        stats = self.scheduler.step() if self.scheduler is not None else None
        if stats:
            self._pending.update(stats)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history:
                state.log_history[-1].update(self._pending)
            self._pending = {}


def _check_zero3_saving() -> None:
    """Under ZeRO-3 the Trainer saves only what DeepSpeed gathers for it: without the gathering switch it would
    hand save_pretrained nothing, after the whole run. Refuse at the start instead."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled
    except ImportError:
        return
    if not is_deepspeed_zero3_enabled():
        return
    zero = (deepspeed_config() or {}).get("zero_optimization", {})
    if not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ValueError(
            "DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the Trainer would save an empty sparse "
            "adapter at the end of the run. Set zero_optimization.stage3_gather_16bit_weights_on_model_save: true in the "
            "DeepSpeed config (accelerate config: zero3_save_16bit_model: true)"
        )


def install_default_callback() -> None:
    """Put SparseCallback in every Trainer's default callbacks (once; a re-import replaces the class)."""
    from transformers import trainer as trainer_module

    defaults = trainer_module.DEFAULT_CALLBACKS
    defaults[:] = [c for c in defaults if getattr(c, "__name__", "") != "SparseCallback"] + [SparseCallback]
