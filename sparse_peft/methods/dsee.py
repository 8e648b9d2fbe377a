"""DSEE (Chen et al., ACL 2023): a low-rank plus a sparse update, then optional pruning.

The sparse support is where a rank-8 fit of the pretrained weight leaves the largest residual
(`selection="lowrank_residual"`); like DSEE's code, lora_alpha / r scales the sparse part too.
The second sparsity, pruning the merged weights, is `sparse_peft.prune` after training.
"""

METHOD = dict(
    name="dsee",
    title="DSEE: dually sparsity-embedded efficient tuning",
    paper="https://arxiv.org/abs/2111.00160",
    defaults=dict(
        structure="unstructured", selection="lowrank_residual", residual_rank=8, density=0.005, r=8, lora_alpha=16,
        scale_sparse=True,
    ),
)
