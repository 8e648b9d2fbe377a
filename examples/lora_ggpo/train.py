"""LoRA-GGPO: a LoRA whose training forwards see the frozen weight plus Gaussian noise, scaled per row by the
weight's norm and the last step's gradient norm: it steers training away from sharp minima.

    python examples/lora_ggpo/train.py                                 # offline, the embedded model and data
    python examples/lora_ggpo/train.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --max_steps 1000
    python examples/lora_ggpo/double_descent.py                        # GGPO vs LoRA on a noisy task, with a plot
"""

import os
import sys

from trl import SFTTrainer

from sparse_peft import SparseConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/common.py
import common  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__, "lora_ggpo", lr=2e-2)
    p.add_argument("--r", type=int, help="LoRA rank (preset 8)")
    p.add_argument("--sigma", type=float, help="noise scale σ, relative to the weight's row norm (preset 0.03)")
    p.add_argument("--beta", type=float, help="weight β of the gradient-norm term in the noise (preset 0.01)")
    args = common.parse(p, argv)
    model, tokenizer = common.load_model(args)
    train, evals = common.load_data(args)

    config = SparseConfig(method="lora_ggpo", r=args.r, perturbation_sigma=args.sigma, perturbation_beta=args.beta,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=common.sft_config(args), train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, peft_config=config)
    # refreshes the noise scale before every optimizer step, from the clipped gradients; logs it as
    # sparse/perturbation_std (the mean per-entry std over the layers). Without it the noise never adapts.
    trainer.model.print_trainable_parameters()

    before = common.eval_loss(trainer.model, trainer)  # eval forwards are clean: the noise is for training only
    trainer.train()
    common.save_and_reload(args, trainer, before)


if __name__ == "__main__":
    main()
