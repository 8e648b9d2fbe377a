"""PaCA (Woo et al., 2025, arXiv 2503.01905): partial connection adaptation, r random input columns per layer.

Each adapted weight trains r of its input columns, chosen at random and fixed: a dense (out × r)
block, as the paper's `r`. Backward keeps only those r columns of the layer's input for the block's
gradient (ops.ColumnLinear, the same op as S²FT's channels), which is where PaCA's memory saving
comes from; no low-rank part. The paper writes the columns into the base weight in place; here the
update stays separable (disable_adapter, several adapters and unmerging keep working): the forward
is the base GEMM plus x[:, cols]·Bᵀ, a product r/in the size of the base's (benchmarks/run.py times
it against PEFT's LoRA).

`num_columns` sets r directly; without it the general budget applies (`density` of the input columns,
or `equivalent_rank` for LoRA's trainable count). Default targets ("all-linear"): the paper adapts
every linear layer of the transformer blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ._base import Method


@dataclass
class PacaKnobs:
    num_columns: Optional[int] = field(default=8, metadata={
        "help": "r: input columns trained per layer (a dense out × r block each). None: the general budget "
        "(density of the columns, or equivalent_rank)."})


class Paca(Method):
    title = "PaCA: partial connection adaptation"
    paper = "https://arxiv.org/abs/2503.01905"
    defaults = dict(structure="columns", selection="random", density=0.01, r=0)
    Knobs = PacaKnobs

    def check(self, config) -> None:
        columns = config.knobs.num_columns
        if columns is not None and (not isinstance(columns, int) or columns < 1):
            raise ValueError(f"num_columns={columns!r} must be a positive integer (r, input columns per layer) or None")
        if config.structure != "columns":
            raise ValueError(f"PaCA trains input columns: structure must be 'columns', not {config.structure!r}")
        budget = [n for n in ("density", "equivalent_rank", "num_trainable") if n in config.given]
        if columns is not None and budget and "num_columns" in config.given:
            raise ValueError(f"num_columns={columns} and {budget[0]} both set PaCA's budget: keep one")
        if columns is not None and budget:
            config.knobs.num_columns = config.method_config["num_columns"] = None  # the user's budget replaces r

    def budget(self, config, structure: str, out_features: int, in_features: int) -> Optional[int]:
        columns = config.knobs.num_columns
        return None if columns is None else min(columns, in_features)

    def card_lines(self, config) -> list[str]:
        columns = config.knobs.num_columns
        return [f"r = {columns} random input columns per layer" if columns else "random input columns (general budget)"]
