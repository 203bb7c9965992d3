"""Checkpoint key names: every writer's names mapped onto ours (which are the Hub's), and onto transformers'.

Four writers name PaliGemma's tensors differently (docs/model.md, "Key-name variants"); the model's modules are
named after the Hub checkpoint's keys, so the map is the identity plus a small normaliser. A stored lm_head is the
tied embedding: it is matched (shape-checked) and skipped.
"""

from __future__ import annotations

LM_HEAD = "lm_head.weight"  # stored only by some writers; equals the embedding (tied)
EMBEDDING = "language_model.model.embed_tokens.weight"
TIED = {LM_HEAD: EMBEDDING}


def normalize_key(key: str) -> str:
    """Map any of the four writers' names (docs/model.md, "Key-name variants") onto our (Hub) parameter names."""
    if key in ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight"):
        return LM_HEAD
    k = key.removeprefix("model.")
    for old, new in (
        ("vision_tower.vision_model.", "vision_tower.vision_model."),
        ("vision_tower.", "vision_tower.vision_model."),  # transformers 5.x drops `vision_model.`
        ("multi_modal_projector.linear.", "multi_modal_projector.linear."),
        ("multi_modal_projector.", "multi_modal_projector.linear."),
        ("language_model.model.", "language_model.model."),
        ("language_model.", "language_model.model."),  # transformers >= 4.52 in memory
    ):
        if k.startswith(old):
            return new + k[len(old) :]
    return key


_TO_TRANSFORMERS = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
)


def transformers_key(key: str) -> str | None:
    """Stored key -> transformers 5.x `PaliGemmaForConditionalGeneration` parameter name."""
    name = normalize_key(key)
    if name == LM_HEAD:
        return LM_HEAD
    for ours, theirs in _TO_TRANSFORMERS:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return None
