"""LoRA-GGPO (Chang et al., 2025, arXiv v1): LoRA with gradient-guided weight perturbation.

Our reconstruction of v1 (no official code was published): each training forward adds Gaussian
noise to the merged weight, row-wise scaled by the weight and previous-step gradient norms.

Default targets ("all-linear"): every linear layer except the output head; all of the paper's runs
put LoRA (r = 8, α = 16) on all linear layers.
"""

METHOD = dict(
    name="lora_ggpo",
    title="LoRA-GGPO: gradient-guided perturbation optimization",
    paper="https://arxiv.org/abs/2502.14538",
    default_targets="all-linear",
    defaults=dict(structure="none", r=8, perturbation="ggpo", perturbation_sigma=0.03, perturbation_beta=0.01),
)
