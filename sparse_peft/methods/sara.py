"""SaRA (Hu et al., ICLR 2025): re-train the smallest-magnitude weights."""

METHOD = dict(
    name="sara",
    title="SaRA: re-training the ineffective parameters",
    paper="https://arxiv.org/abs/2409.06633",
    defaults=dict(structure="unstructured", selection="small_magnitude", density=0.01, r=0),
    missing="the nuclear-norm regulariser and the progressive re-selection (issue #5)",
)
