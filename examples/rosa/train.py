"""RoSA: a LoRA plus a sparse part whose mask is the top-k of each weight's squared gradients summed over a
warm-up; only the LoRA trains during the warm-up, then both do. One run (the paper's code needs two).

    python examples/rosa/train.py                                      # offline, the embedded model and data
    python examples/rosa/train.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --max_steps 1000
"""

import os
import sys

from trl import SFTTrainer

from sparse_peft import SparseConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/common.py
import common  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__, "rosa", lr=1e-2)
    p.add_argument("--r", type=int, help="rank of the low-rank part (preset 16)")
    p.add_argument("--density", type=float, help="fraction of each weight in the sparse part (preset 0.006)")
    p.add_argument("--warmup_steps", type=int,
                   help="optimizer steps of gradient statistics before the mask is chosen (default: a fifth of "
                   "max_steps, at most 20)")
    args = common.parse(p, argv)
    model, tokenizer = common.load_model(args)
    train, evals = common.load_data(args)

    warmup = args.warmup_steps or max(1, min(20, args.max_steps // 5))
    config = SparseConfig(method="rosa", r=args.r, density=args.density, warmup_steps=warmup,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=common.sft_config(args), train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, peft_config=config)
    trainer.model.print_trainable_parameters()
    # at step `warmup` the log shows sparse/mask_chosen_layers: every adapted layer's mask was chosen then
    before = common.eval_loss(trainer.model, trainer)
    trainer.train()
    common.save_and_reload(args, trainer, before)


if __name__ == "__main__":
    main()
