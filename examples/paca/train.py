"""PaCA: r random input columns of every linear layer train (a dense out × r block each); backward keeps only
those columns of the layer's input. No low-rank part; the update stays separable from the base weight.

    python examples/paca/train.py                                      # offline, the embedded model and data
    python examples/paca/train.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --max_steps 1000
"""

import os
import sys

from trl import SFTTrainer

from sparse_peft import SparseConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/common.py
import common  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__, "paca", lr=1e-2)
    p.add_argument("--columns", type=int, help="r: input columns trained per layer (preset 8)")
    args = common.parse(p, argv)
    model, tokenizer = common.load_model(args)
    train, evals = common.load_data(args)

    config = SparseConfig(method="paca", num_columns=args.columns, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=common.sft_config(args), train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, peft_config=config)
    trainer.model.print_trainable_parameters()
    before = common.eval_loss(trainer.model, trainer)
    trainer.train()
    common.save_and_reload(args, trainer, before)


if __name__ == "__main__":
    main()
