"""S²FT (Yang et al., NeurIPS 2024): dense blocks on selected input channels, partial backprop.

Default targets ("roles"): the attention and FFN output projections from the architecture map
(o_proj and down_proj in Llama), where heads and channels are input columns: the paper spends its
budget there, and that is where partial backprop saves activation memory. A model without a map
needs target_modules; its input columns then train without head groups.
"""

from ._base import Method


class S2ft(Method):
    title = "S²FT: structured sparse fine-tuning"
    paper = "https://arxiv.org/abs/2412.06289"
    defaults = dict(structure="columns", selection="random", density=0.05, r=0, head_groups=True)
    default_targets = "roles"
    target_roles = ("attention_output", "ffn_down")
