"""Where heads and FFN channels live in each supported architecture (S²FT's map).

For every decoder block we need to know which module consumes the attention heads (its input
columns come in blocks of head_dim, one block per query head, grouped-query or not) and which
consumes the FFN channels (one input column per channel), and which modules produce them (their
output rows): up/gate make the channels, the value projection makes what each head reads. Names
are module-name suffixes, so they match in every layer without listing the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Roles:
    attention_output: str  # input columns = heads × head_dim
    ffn_down: str  # input columns = FFN channels
    ffn_up: tuple[str, ...]  # output rows = FFN channels
    value: Optional[str]  # output rows = key/value heads × head_dim


_LLAMA_LIKE = Roles("o_proj", "down_proj", ("up_proj", "gate_proj"), "v_proj")

ARCHITECTURES: dict[str, Roles] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    # GPT-2 fuses q, k and v into one Conv1D (c_attn), so it has no separate value projection
    "gpt2": Roles("attn.c_proj", "mlp.c_proj", ("mlp.c_fc",), None),
    "opt": Roles("out_proj", "fc2", ("fc1",), "v_proj"),
}


# The row roles S²FT can couple, and the column role whose units they produce: FFN channel j is output
# row j of up/gate and input column j of down; a value row feeds the attention-output columns of the
# query heads that read its key/value head.
ROW_PARTNERS = {"ffn_up": "ffn_down", "value": "attention_output"}


def roles_for(model_config: dict) -> Roles:
    model_type = model_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"sparse_peft has no map of heads and channels for model_type={model_type!r} (known: "
            f"{sorted(ARCHITECTURES)}); pass target_modules explicitly, and head_groups=False, or add the "
            "architecture to sparse_peft.architectures.ARCHITECTURES"
        )
    return ARCHITECTURES[model_type]


def head_dim(model_config: dict) -> int:
    if model_config.get("head_dim"):
        return int(model_config["head_dim"])
    hidden = model_config.get("hidden_size") or model_config.get("n_embd")
    heads = model_config.get("num_attention_heads") or model_config.get("n_head")
    if not hidden or not heads:
        raise ValueError("cannot tell the head size of this model: its config has no head_dim, hidden_size or num_attention_heads")
    return int(hidden) // int(heads)


def role_targets(model_config: dict, roles: tuple[str, ...]) -> list[str]:
    """Module-name suffixes for named roles ("attention_output", "ffn_down", "ffn_up", "value")."""
    mapped = roles_for(model_config)
    names = []
    for role in roles:
        value = getattr(mapped, role)
        names.extend(value if isinstance(value, tuple) else [value] if value else [])
    return names


def queries_per_kv(model_config: dict) -> int:
    """Query heads that read each key/value head: 1 without grouped-query attention."""
    heads = model_config.get("num_attention_heads") or model_config.get("n_head")
    return int(heads) // int(model_config.get("num_key_value_heads") or heads)


def row_pairs(model_config: dict, row_roles) -> dict[str, tuple[str, str]]:
    """{row module suffix: (its partner column module suffix, row role)} for the given row roles."""
    mapped = roles_for(model_config)
    pairs = {}
    for role in row_roles:
        suffixes = getattr(mapped, role)
        if not suffixes:
            raise ValueError(
                f"model_type={model_config.get('model_type')!r} has no separate {role} projection (e.g. GPT-2 fuses "
                f"q, k and v in one layer), so its rows cannot be coupled: remove {role!r} from coupled_rows"
            )
        for suffix in suffixes if isinstance(suffixes, tuple) else (suffixes,):
            pairs[suffix] = (getattr(mapped, ROW_PARTNERS[role]), role)
    return pairs


def value_rows(columns, head_size: int, queries_per_kv: int):
    """The output rows of the value projection that attention-output input columns read.

    Column c belongs to query head c // head_size, which reads key/value head
    (c // head_size) // queries_per_kv, at the same position c % head_size within the head. Under
    grouped-query attention several selected query heads may share one value head: its rows appear
    once. Returns sorted, unique int64 indices.
    """
    columns = columns.long()
    return ((columns // (head_size * queries_per_kv)) * head_size + columns % head_size).unique()
