"""SpIEL: train 1% of each weight's entries; every 20 steps drop the weakest and regrow where the gradient is largest.

    python examples/spiel/train.py                                     # offline, the embedded model and data
    python examples/spiel/train.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --max_steps 1000
"""

import os
import sys

from trl import SFTTrainer

from sparse_peft import SparseConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/common.py
import common  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__, "spiel", lr=1e-2)
    p.add_argument("--density", type=float, help="fraction of each weight that trains (preset 0.01)")
    p.add_argument("--reselection_steps", type=int, help="steps between drop-and-regrow rounds (preset 20; 0: fixed)")
    args = common.parse(p, argv)
    model, tokenizer = common.load_model(args)
    train, evals = common.load_data(args)

    config = SparseConfig(method="spiel", density=args.density, reselection_steps=args.reselection_steps,
                          target_modules="all-linear", task_type="CAUSAL_LM")  # None keeps the method's preset
    trainer = SFTTrainer(model=model, args=common.sft_config(args), train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, peft_config=config)
    trainer.model.print_trainable_parameters()

    before = common.eval_loss(trainer.model, trainer)
    trainer.train()
    common.save_and_reload(args, trainer, before)


if __name__ == "__main__":
    main()
