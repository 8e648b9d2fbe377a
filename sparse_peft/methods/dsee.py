"""DSEE (Chen et al., ACL 2023): a low-rank plus a sparse update, then optional pruning."""

METHOD = dict(
    name="dsee",
    title="DSEE: dually sparsity-embedded efficient tuning",
    paper="https://arxiv.org/abs/2111.00160",
    defaults=dict(structure="unstructured", selection="magnitude", density=0.005, r=8),
    missing="the low-rank-residual support and the final weight pruning (issue #5); "
    "until then the sparse support is the largest-magnitude weights",
)
