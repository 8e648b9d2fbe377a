"""S²FT (Yang et al., NeurIPS 2024): dense blocks on selected input channels, partial backprop."""

METHOD = dict(
    name="s2ft",
    title="S²FT: structured sparse fine-tuning",
    paper="https://arxiv.org/abs/2412.06289",
    defaults=dict(structure="columns", selection="random", density=0.05, r=0, head_groups=True),
    # the paper's finding: the budget is best spent on the output projections of attention and FFN
    target_roles=("attention_output", "ffn_down"),
    missing="",
)
