"""SaRA: re-train each weight's smallest-magnitude entries (the "ineffective" ones) under a nuclear-norm penalty
that keeps the update low-rank; halfway through, only the entries still below the threshold keep training.

    python examples/sara/train.py                                      # offline, the embedded model and data
    python examples/sara/train.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --max_steps 1000
"""

import os
import sys

from trl import SFTTrainer

from sparse_peft import SparseConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/common.py
import common  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__, "sara", lr=1e-2)
    p.add_argument("--density", type=float, help="fraction of each weight that trains, the smallest |w| (preset 0.01)")
    p.add_argument("--threshold", type=float, help="instead of --density: train every |w| below it (paper: 2e-3)")
    p.add_argument("--nuclear_norm_weight", type=float, help="λ of the nuclear-norm penalty (preset 5e-4; 0: off)")
    p.add_argument("--progressive_step", type=float,
                   help="step (>= 1) or fraction of the run (< 1) of the progressive freeze (preset 0.5)")
    args = common.parse(p, argv)
    model, tokenizer = common.load_model(args)
    train, evals = common.load_data(args)

    step = args.progressive_step
    config = SparseConfig(method="sara", density=args.density, threshold=args.threshold,
                          nuclear_norm_weight=args.nuclear_norm_weight,
                          progressive_step=int(step) if step and step >= 1 else step,  # a step number is an int
                          target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=common.sft_config(args), train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, peft_config=config)
    # runs the penalty before every optimizer step and the progressive freeze once; logs sparse/nuclear_norm
    # (the penalised layer's ||ΔW||_*) and, at the freeze, sparse/progressive_kept (the fraction still training)
    trainer.model.print_trainable_parameters()

    before = common.eval_loss(trainer.model, trainer)
    trainer.train()
    common.save_and_reload(args, trainer, before)


if __name__ == "__main__":
    main()
