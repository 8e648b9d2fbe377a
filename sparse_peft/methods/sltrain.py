"""SLTrain (Han et al., NeurIPS 2024): a low-rank plus a fixed random sparse update.

The support is uniform at density 0.03 and never stored: a portable generator redraws it from the
seed and the module's name at load time. Fine-tuning settings from the paper's appendix G
(r = 8, α = 32); pretraining from scratch is `sparse_peft.pretraining.convert`.

Default targets ("all-linear"): every linear layer except the output head. SLTrain replaces every
linear layer of attention and MLP (q, k, v, o, gate, up, down) and leaves embeddings and lm_head
dense; its fine-tuning appendix gives no other set.
"""

from ._base import Method


class SLTrain(Method):
    title = "SLTrain: sparse plus low-rank training"
    paper = "https://arxiv.org/abs/2406.02214"
    defaults = dict(structure="unstructured", selection="random", density=0.03, r=8, lora_alpha=32, store_indices=False)
