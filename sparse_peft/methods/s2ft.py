"""S²FT (Yang et al., NeurIPS 2024): dense blocks on selected input channels, partial backprop."""

METHOD = dict(
    name="s2ft",
    title="S²FT: structured sparse fine-tuning",
    paper="https://arxiv.org/abs/2412.06289",
    defaults=dict(structure="columns", selection="random", density=0.05, r=0),
    missing="head/channel maps per architecture and the row side of q/k/v/up/gate (issue #4); "
    "until then every target trains random input columns",
)
