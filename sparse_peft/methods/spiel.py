"""SpIEL (Ansell et al., 2024): a random sparse delta per weight, pruned and regrown during training.

Default targets ("all-linear"): every linear layer except the output head. The official tuner's
default is every nn.Linear under the base model prefix (so not lm_head), and the paper's LLM runs
train q, k, v, o, gate, up and down, which is the same set on a Llama.
"""

METHOD = dict(
    name="spiel",
    title="SpIEL: sparse fine-tuning with index pruning and regrowth",
    paper="https://arxiv.org/abs/2401.16405",
    default_targets="all-linear",
    defaults=dict(
        structure="unstructured",
        selection="random",
        density=0.01,
        r=0,
        reselection_steps=20,
        accumulation_steps=5,
        initial_reselection_rate=0.2,
        reselection_rate_policy="linear",
        regrowth="gradient",
    ),
)
