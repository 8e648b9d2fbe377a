"""S²FT: train whole attention heads and FFN channels (input columns of o_proj and down_proj); by default the
ones with the smallest activations, chosen by a short calibration pass before training.

    python examples/s2ft/train.py                                      # offline, the embedded model and data
    python examples/s2ft/train.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --max_steps 1000
"""

import itertools
import os
import sys

from torch.utils.data import DataLoader
from trl import SFTTrainer

import sparse_peft
from sparse_peft import SparseConfig
from sparse_peft.selection import CALIBRATION_RULES

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/common.py
import common  # noqa: E402


def calibration_batches(trainer, n):
    """The first n training batches as the model takes them; the gradient rules also need their labels."""
    loader = DataLoader(trainer.train_dataset, batch_size=trainer.args.per_device_train_batch_size,
                        collate_fn=trainer.data_collator)
    for batch in itertools.islice(loader, n):
        yield {k: v.to(trainer.model.device) for k, v in batch.items()
               if k in ("input_ids", "attention_mask", "labels")}


def main(argv=None):
    p = common.parser(__doc__, "s2ft", lr=1e-2)
    p.add_argument("--selection", default="small_activation",
                   help="which heads/channels train: small_activation (the paper's best), activation, "
                   "small_gradient, gradient, random, ... (default %(default)s)")
    p.add_argument("--density", type=float, help="fraction of heads and channels that train (preset 0.05)")
    p.add_argument("--calibration_batches", type=int, default=8, help="batches the calibration pass sees (default 8)")
    args = common.parse(p, argv)
    model, tokenizer = common.load_model(args)
    train, evals = common.load_data(args)

    # no target_modules: S²FT's own, the attention and FFN output projections
    config = SparseConfig(method="s2ft", selection=args.selection, density=args.density, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=common.sft_config(args), train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, peft_config=config)
    if config.selection in CALIBRATION_RULES:
        # the extra step: score the columns on training data. Until then the support is a placeholder and the
        # adapter refuses to train. Before trainer.train(), which creates the optimizer over the chosen columns.
        sparse_peft.calibrate(trainer.model, calibration_batches(trainer, args.calibration_batches))
    trainer.model.print_trainable_parameters()

    before = common.eval_loss(trainer.model, trainer)
    trainer.train()
    common.save_and_reload(args, trainer, before)


if __name__ == "__main__":
    main()
