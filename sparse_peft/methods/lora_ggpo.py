"""LoRA-GGPO (Chang et al., 2025, arXiv v1): LoRA with gradient-guided weight perturbation.

Our reconstruction of v1 (no official code was published): each training forward adds Gaussian
noise to the merged weight, row-wise scaled by the weight and previous-step gradient norms.
"""

METHOD = dict(
    name="lora_ggpo",
    title="LoRA-GGPO: gradient-guided perturbation optimization",
    paper="https://arxiv.org/abs/2502.14538",
    defaults=dict(structure="none", r=8, perturbation="ggpo", perturbation_sigma=0.03, perturbation_beta=0.01),
)
