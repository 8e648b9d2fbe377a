"""Where heads and FFN channels live in each supported architecture (S²FT's map).

For every decoder block we need to know which module consumes the attention heads (its input
columns come in blocks of head_dim, one block per query head, grouped-query or not) and which
consumes the FFN channels (one input column per channel), and which modules produce them (their
output rows): up/gate make the channels, the value projection makes what each head reads. Names
are module-name suffixes, so they match in every layer without listing the layers.

Fused layers: Phi-3's gate_up_proj holds gate and up in one weight, and Phi-3, GPT-2, GPT-NeoX and
Falcon compute q, k and v in one layer. Their columns (the output projections) are mapped as usual;
their rows are not coupled (see `Roles.fused`), and `coupled_rows` refuses them with the reason.

Mixture-of-experts models in transformers 5 (Mixtral, Qwen2-MoE, Qwen3-MoE) keep their routed
experts as fused 3-D parameters (`experts.gate_up_proj`: experts × 2·intermediate × hidden,
`experts.down_proj`: experts × hidden × intermediate), not as nn.Linear layers, so no sparse_peft
layer can wrap them: they stay frozen (`fused_experts` finds them, and naming them in
target_modules is refused). What adapts there: attention (o_proj heads, v_proj rows, q/k/v/o with
all-linear), Qwen2-MoE's shared expert (an ordinary gate/up/down MLP), and dense MLP layers
(`mlp_only_layers`), which the same suffixes match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ._peft import all_linear_layer_names

# where sparse_peft says which targets it chose for the user (one line per adapter)
logger = logging.getLogger("sparse_peft")


@dataclass(frozen=True)
class Roles:
    attention_output: str  # input columns = heads × head_dim
    ffn_down: str  # input columns = FFN channels
    ffn_up: tuple[str, ...]  # output rows = FFN channels
    value: Optional[str]  # output rows = key/value heads × head_dim
    # the module that computes the queries (with k and v where they are fused: then it is the only one)
    query: str = ""
    # (row role, why its rows cannot be coupled here): the layer that produces those units is fused
    fused: tuple[tuple[str, str], ...] = ()


_LLAMA_LIKE = Roles("o_proj", "down_proj", ("up_proj", "gate_proj"), "v_proj", query="q_proj")
_FUSED_QKV = "computes q, k and v in one layer ({})"

ARCHITECTURES: dict[str, Roles] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,  # head_dim comes from the config (Gemma's heads × head_dim need not be hidden_size)
    "gemma3_text": _LLAMA_LIKE,  # Gemma3ForCausalLM; the multimodal "gemma3" nests its text config: unmapped
    # mixture of experts: the routed experts are fused 3-D parameters (module docstring); down_proj and
    # up/gate match Qwen2-MoE's shared expert and the dense MLP layers of mlp_only_layers, and nothing in Mixtral
    "mixtral": _LLAMA_LIKE,
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    # GPT-2 fuses q, k and v in one Conv1D (c_attn), so it has no separate value projection
    "gpt2": Roles("attn.c_proj", "mlp.c_proj", ("mlp.c_fc",), None, query="attn.c_attn",
                  fused=(("value", _FUSED_QKV.format("attn.c_attn")),)),
    "opt": Roles("out_proj", "fc2", ("fc1",), "v_proj", query="q_proj"),
    "phi3": Roles(
        "o_proj", "down_proj", (), None, query="qkv_proj",
        fused=(
            ("value", _FUSED_QKV.format("qkv_proj")),
            ("ffn_up", "fuses gate and up in one layer (gate_up_proj, where FFN channel j is rows j and "
                       "intermediate_size + j)"),
        ),
    ),
    # GPT-NeoX and Falcon: fused q/k/v (query_key_value), separate up (dense_h_to_4h)
    "gpt_neox": Roles("attention.dense", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",), None,
                      query="attention.query_key_value",
                      fused=(("value", _FUSED_QKV.format("attention.query_key_value")),)),
    "falcon": Roles("self_attention.dense", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",), None,
                    query="self_attention.query_key_value",
                    fused=(("value", _FUSED_QKV.format("self_attention.query_key_value")),)),
}


# The row roles S²FT can couple, and the column role whose units they produce: FFN channel j is output
# row j of up/gate and input column j of down; a value row feeds the attention-output columns of the
# query heads that read its key/value head.
ROW_PARTNERS = {"ffn_up": "ffn_down", "value": "attention_output"}


def known_roles(model_config: dict) -> Optional[Roles]:
    """The map of this model's heads and channels, or None where sparse_peft has none."""
    return ARCHITECTURES.get(model_config.get("model_type"))


def roles_for(model_config: dict) -> Roles:
    model_type = model_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"sparse_peft has no map of heads and channels for model_type={model_type!r} (known: "
            f"{sorted(ARCHITECTURES)}); pass target_modules explicitly (their input columns then train without "
            "head groups), or add the architecture to sparse_peft.architectures.ARCHITECTURES"
        )
    return ARCHITECTURES[model_type]


def head_dim(model_config: dict) -> int:
    if model_config.get("head_dim"):
        return int(model_config["head_dim"])
    hidden = model_config.get("hidden_size") or model_config.get("n_embd")
    heads = model_config.get("num_attention_heads") or model_config.get("n_head")
    if not hidden or not heads:
        raise ValueError(
            "cannot tell the head size of this model (its config has no head_dim, hidden_size or num_attention_heads), "
            "which head_groups / coupled_rows='value' need: set head_groups=False and leave 'value' out of coupled_rows"
        )
    return int(hidden) // int(heads)


def role_targets(model_config: dict, roles: tuple[str, ...], method: str = "") -> list[str]:
    """Module-name suffixes for named roles ("attention_output", "ffn_down", "ffn_up", "value", "query").

    An unmapped model is refused with the fix: name the layers in target_modules."""
    mapped = known_roles(model_config)
    if mapped is None:
        raise ValueError(
            f"method={method!r} picks its default targets by role ({', '.join(roles)}) from sparse_peft's map of "
            f"heads and channels, which has no model_type={model_config.get('model_type')!r} (known: "
            f"{sorted(ARCHITECTURES)}): pass target_modules explicitly, e.g. target_modules=['o_proj', 'down_proj'] "
            "(the attention and FFN output projections, by your model's names): their input columns then train, "
            "in whole heads only where the map knows the heads. Or add the architecture to "
            "sparse_peft.architectures.ARCHITECTURES."
        )
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
    """{row module suffix: (its partner column module suffix, row role)} for the given row roles.

    Refuses, with the fix, a model without a map and a role whose producing layer is fused or absent."""
    model_type = model_config.get("model_type")
    mapped = known_roles(model_config)
    if mapped is None:
        raise ValueError(
            f"coupled_rows={list(row_roles)} needs sparse_peft's map of which layers produce the heads and FFN "
            f"channels, and it has no model_type={model_type!r} (known: {sorted(ARCHITECTURES)}): remove "
            "coupled_rows (the columns in target_modules still train), or add the architecture to "
            "sparse_peft.architectures.ARCHITECTURES"
        )
    pairs = {}
    for role in row_roles:
        suffixes = getattr(mapped, role)
        if not suffixes:
            why = dict(mapped.fused).get(role, "has no such layer")
            raise ValueError(
                f"model_type={model_type!r} has no separate {role} projection: it {why}. sparse_peft couples the rows "
                f"of separate layers only, so remove {role!r} from coupled_rows (the columns of "
                f"{getattr(mapped, ROW_PARTNERS[role])} still train)"
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


def fused_experts(model: nn.Module) -> list[tuple[str, list[str]]]:
    """[(module name, its 3-D parameter names)] for the modules that keep mixture-of-experts weights as
    fused 3-D parameters (transformers 5's Mixtral, Qwen2-MoE, Qwen3-MoE experts: experts × out × in).
    sparse_peft wraps layers, not parameters, so these cannot be adapted. Only modules whose class
    names experts count (transformers names them so: MixtralExperts, Qwen3MoeExperts, ...); other
    3-D parameters (convolutions, ViT's position embeddings) are no experts."""
    found = []
    for name, module in model.named_modules():
        if "expert" not in type(module).__name__.lower():
            continue
        params = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        if params:
            found.append((name, params))
    return found


# How each default rule reads in the one line that reports the chosen targets.
DEFAULT_RULES = {
    "all-linear": "every linear layer except the output head (PEFT's 'all-linear')",
    "all-layers": "every linear and Conv2d layer except the output head",
    "query_value": "the attention query and value projections",
    "roles": "by role from the architecture map",
}


def default_targets(model: nn.Module, model_config: dict, rule: str, roles: tuple = (), method: str = "",
                    task_type=None):
    """The target_modules a rule of `DEFAULT_RULES` gives this model: a set of module names or suffixes.

    Refuses, naming target_modules as the fix, when the rule needs a map the model lacks."""
    if rule == "roles":
        return _present(model, role_targets(model_config, roles, method))
    if rule == "query_value":
        mapped = known_roles(model_config)
        if mapped is not None and mapped.query:
            return _present(model, role_targets(model_config, ("query", "value"), method))
        found = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_config.get("model_type"))
        if found is None:
            raise ValueError(
                f"method={method!r} defaults to the attention query and value projections, and neither sparse_peft's "
                f"map nor PEFT's LoRA table knows them for model_type={model_config.get('model_type')!r}: pass "
                "target_modules (a list of module names, a regex, or 'all-linear')"
            )
        return found if isinstance(found, str) else set(found)
    if rule in ("all-linear", "all-layers"):
        names = all_linear_layer_names(model, task_type)
        if rule == "all-layers":
            inside = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)
                      for c, _ in m.named_modules() if c}
            convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) or
                     (isinstance(m, BaseTunerLayer) and isinstance(m.get_base_layer(), nn.Conv2d))}
            names = set(names) | (convs - inside)
        return set(names)
    raise ValueError(f"unknown default-target rule {rule!r}; known: {sorted(DEFAULT_RULES)}")


def _present(model: nn.Module, suffixes) -> set:
    """The suffixes that name at least one module of the model (Mixtral has no down_proj layer: its experts
    are parameters), so that a saved config names only layers; all of them if none does (PEFT then says so)."""
    keys = [key for key, _ in model.named_modules()]
    found = {s for s in suffixes if any(k == s or k.endswith("." + s) for k in keys)}
    return found or set(suffixes)
