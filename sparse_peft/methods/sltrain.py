"""SLTrain (Han et al., NeurIPS 2024): low-rank plus a fixed random sparse update."""

METHOD = dict(
    name="sltrain",
    title="SLTrain: sparse plus low-rank training",
    paper="https://arxiv.org/abs/2406.02214",
    defaults=dict(structure="unstructured", selection="random", density=0.03, r=8),
    missing="the paper's initialisation and pretraining mode (issue #7)",
)
