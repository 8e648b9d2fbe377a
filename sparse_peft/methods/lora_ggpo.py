"""LoRA-GGPO (2025): LoRA with gradient-guided weight perturbation."""

METHOD = dict(
    name="lora_ggpo",
    title="LoRA-GGPO: gradient-guided perturbation optimization",
    paper="https://arxiv.org/abs/2502.14538",
    defaults=dict(structure="none", r=8),
    missing="the gradient-guided perturbation (issue #7); until then this is plain LoRA",
)
