"""SpIEL (Ansell et al., 2024): a random sparse delta per weight, pruned and regrown during training."""

METHOD = dict(
    name="spiel",
    title="SpIEL: sparse fine-tuning with index pruning and regrowth",
    paper="https://arxiv.org/abs/2401.16405",
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
