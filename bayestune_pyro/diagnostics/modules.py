"""Parameter names → module type and layer index: the grouping of the paper's module-wise and layer-wise figures.

Names follow the backbone (``bert.encoder.layer.3.attention.self.query.weight``, timm's ``blocks.3.mlp.fc1``);
the first matching pattern wins, anything else is ``other`` (pooler, convolutions, fused qkv, …).
"""
from __future__ import annotations

import re

MODULE_TYPES = (
    ("lora", r"\.bt_lora_"),  # the additive search space's modules (search_spaces/additive.py)
    ("adapter", r"\.bt_adapter_"),
    ("prompt", r"\.bt_prompt_"),
    ("LayerNorm", r"layernorm|layer_norm|(^|\.)(ln|norm)\w*\."),
    ("embeddings", r"embed|cls_token"),
    ("query", r"\.query\.|q_proj"),
    ("key", r"\.key\.|k_proj"),
    ("value", r"\.value\.|v_proj"),
    ("attention-output", r"attention\.output\.|attn\.(out_)?proj|o_proj"),
    ("intermediate", r"intermediate\.|fc1|up_proj"),
    ("output", r"(^|\.)output\.|fc2|down_proj"),
)
OTHER = "other"
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\.")


def module_type(name: str) -> str:
    """The module type of a parameter tensor: one of :data:`MODULE_TYPES` or ``other``."""
    for kind, pattern in MODULE_TYPES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return kind
    return OTHER


def layer_index(name: str) -> int:
    """The transformer block a parameter tensor belongs to (``encoder.layer.3.`` → 3), or -1 outside the blocks."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else -1
