"""SLTrain: a LoRA plus a fixed random sparse update (3% of each weight), whose positions are never stored:
they are drawn again from the seed when the adapter loads, so the file holds only the values.

    python examples/sltrain/train.py                                   # offline, the embedded model and data
    python examples/sltrain/train.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --max_steps 1000
"""

import os
import sys

from trl import SFTTrainer

from sparse_peft import SparseConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/common.py
import common  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__, "sltrain", lr=1e-2)
    p.add_argument("--r", type=int, help="rank of the low-rank part (preset 8)")
    p.add_argument("--lora_alpha", type=float, help="the low-rank part is scaled by lora_alpha / r (preset 32)")
    p.add_argument("--density", type=float, help="fraction of each weight in the sparse part (preset 0.03)")
    args = common.parse(p, argv)
    model, tokenizer = common.load_model(args)
    train, evals = common.load_data(args)

    config = SparseConfig(method="sltrain", r=args.r, lora_alpha=args.lora_alpha, density=args.density,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=common.sft_config(args), train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, peft_config=config)
    trainer.model.print_trainable_parameters()

    before = common.eval_loss(trainer.model, trainer)
    trainer.train()
    common.save_and_reload(args, trainer, before)


if __name__ == "__main__":
    main()
