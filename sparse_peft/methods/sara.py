"""SaRA (Hu et al., ICLR 2025): re-train the smallest-magnitude weights.

A per-layer fraction of the smallest |w| by default (set `threshold` for the paper's absolute one),
a nuclear-norm penalty on the update (λ = 5e-4, the README's), and at half of the run the
progressive step: only entries still below the threshold keep training.

Default targets ("all-layers"): every linear and Conv2d layer except the output head. The paper's
code masks every parameter of the U-Net (convolutions included); sparse_peft adapts layers, so the
closest default is all the layers it can wrap. Norms, biases and embeddings stay frozen.
"""

METHOD = dict(
    name="sara",
    title="SaRA: re-training the ineffective parameters",
    paper="https://arxiv.org/abs/2409.06633",
    default_targets="all-layers",
    defaults=dict(
        structure="unstructured", selection="small_magnitude", density=0.01, r=0, nuclear_norm_weight=5e-4,
        nuclear_norm_layers=1, progressive_step=0.5,
    ),
)
