"""DSEE (Chen et al., ACL 2023): a low-rank plus a sparse update, then optional pruning.

The sparse support is where a rank-8 fit of the pretrained weight leaves the largest residual
(`selection="lowrank_residual"`); like DSEE's code, lora_alpha / r scales the sparse part too.
The second sparsity, pruning the merged weights, is `sparse_peft.prune` after training.

Default targets ("query_value"): the attention query and value projections, which is what the
paper's code adapts (query and value of BERT/RoBERTa self-attention; key is commented out).
Fused layers count whole: Phi-3's qkv_proj, GPT-2's c_attn, GPT-NeoX's and Falcon's
query_key_value. Where sparse_peft's map lacks the model, PEFT's LoRA table names them.
"""

from ._base import Method


class Dsee(Method):
    title = "DSEE: dually sparsity-embedded efficient tuning"
    paper = "https://arxiv.org/abs/2111.00160"
    defaults = dict(
        structure="unstructured", selection="lowrank_residual", residual_rank=8, density=0.005, r=8, lora_alpha=16,
        scale_sparse=True,
    )
    default_targets = "query_value"
