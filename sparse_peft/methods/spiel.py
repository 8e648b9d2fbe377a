"""SpIEL (Ansell et al., 2024): a random sparse delta per weight, pruned and regrown during training."""

METHOD = dict(
    name="spiel",
    title="SpIEL: sparse fine-tuning with index pruning and regrowth",
    paper="https://arxiv.org/abs/2401.16405",
    defaults=dict(structure="unstructured", selection="random", density=0.01, r=0),
    missing="the drop-and-regrow schedule (issue #3); until then the random start support stays fixed",
)
