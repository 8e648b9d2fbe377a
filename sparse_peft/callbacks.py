"""The sparse schedules inside any Hugging Face or TRL trainer, as one TrainerCallback.

    trainer = SFTTrainer(..., peft_config=SparseConfig(method="spiel"), callbacks=[SparseCallback()])

No Trainer subclass: the callback builds a `SparseScheduler` once the optimizer exists (at
`on_train_begin`), calls it just before every optimizer step (gradients complete and clipped) and
just after (gradients are still in `.grad` then), and adds its statistics (`sparse/density`,
`sparse/churn`, `sparse/nuclear_norm`, `sparse/perturbation_std`, ...) to the next log, so that
W&B, TensorBoard and `trainer.state.log_history` show them.
"""

from __future__ import annotations

import os
import warnings

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .schedule import SparseScheduler


STATE_FILE = "sparse_scheduler.safetensors"


class SparseCallback(TrainerCallback):
    def __init__(self):
        self.scheduler = None
        self._pending: dict = {}

    @classmethod
    def attach(cls, trainer) -> "SparseCallback":
        """Add the callback first in the trainer's list, so that reporting integrations called after it
        (W&B, TensorBoard, ...) see its statistics in the same log. Passing it in `callbacks=` also
        works, but then only `trainer.state.log_history` gets them."""
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.scheduler = SparseScheduler(model, optimizer, total_steps=state.max_steps)
        if state.global_step and self.scheduler.enabled:
            # a resumed run: the Trainer has restored the adapter and the optimizer; restore the schedule
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.isfile(path):
                self.scheduler.load_state_dict(load_file(path))
            else:
                warnings.warn(f"no {STATE_FILE} beside the checkpoint of step {state.global_step}: the regrowth "
                              "statistics restart empty", stacklevel=2)
                self.scheduler.step_count = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if self.scheduler is not None and self.scheduler.enabled:
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
