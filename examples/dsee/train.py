"""DSEE: a LoRA plus a sparse update where a low-rank fit of the pretrained weight leaves the largest residual;
after training, the merged weights are pruned (the "second sparsity") with sparse_peft.prune.

    python examples/dsee/train.py                                      # offline, the embedded model and data
    python examples/dsee/train.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --max_steps 1000
"""

import os
import sys

from trl import SFTTrainer

import sparse_peft
from sparse_peft import SparseConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/common.py
import common  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__, "dsee", lr=1e-2)
    p.add_argument("--r", type=int, help="rank of the low-rank part (preset 8)")
    p.add_argument("--density", type=float, help="fraction of each weight in the sparse part (preset 0.005)")
    p.add_argument("--prune_sparsity", type=float, default=0.5,
                   help="fraction of the adapted weights set to zero after training; 0 skips pruning (default 0.5)")
    args = common.parse(p, argv)
    model, tokenizer = common.load_model(args)
    train, evals = common.load_data(args)

    config = SparseConfig(method="dsee", r=args.r, density=args.density, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=common.sft_config(args), train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, peft_config=config)
    trainer.model.print_trainable_parameters()

    before = common.eval_loss(trainer.model, trainer)
    trainer.train()
    reloaded = common.save_and_reload(args, trainer, before)

    if args.prune_sparsity:
        # the extra step: merge the adapter and zero the smallest |W + ΔW| of the adapted layers, pooled over them.
        # One shot, no retraining; the result is a plain model (the adapter is merged into it).
        pruned, report = sparse_peft.prune(reloaded, sparsity=args.prune_sparsity)
        print(report)
        print(f"dsee: eval loss after pruning {common.eval_loss(pruned, trainer):.3f}")
        # pruned.save_pretrained(...) keeps it: a full model, whose zeros save memory only in a sparse format


if __name__ == "__main__":
    main()
