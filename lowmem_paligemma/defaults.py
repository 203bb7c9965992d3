"""One home for each default the runtime assumes when the caller does not say; every other place imports it."""

from __future__ import annotations

DEVICE = "auto"  # cuda when available, else cpu (runtime/options.py resolves it)
DTYPE = "auto"  # the 16-bit dtype measured fastest on this machine (formats/chooser.py: choose_dtype)
MAX_NEW_TOKENS = 32  # new tokens of a request
# Prompt text tokens assumed beside the image tokens when a plan is made before the prompt is known (the kernel
# choice weighing prefill against decode, a residency plan for prompts that come later, `info`).
ASSUMED_TEXT_TOKENS = 64
CHUNK_BYTES = 64 << 20  # the loader's read chunks: a bound on the temporaries alive beyond the model
STAGING_BYTES = 32 << 20  # the layer streamer's staging buffers together (layers converted or quantized as read)
# Queries attended at once in a long prefill: the scores (heads x chunk x keys) never exceed this many rows, so an
# 896-px image (4,096 tokens) does not hold heads x 4,096 x 4,096 scores (budget/memory.py counts the same bound).
ATTENTION_QUERY_CHUNK = 1024


def assumed_prompt_tokens(num_image_tokens: int) -> int:
    """A prompt's length when it is not known yet: the image tokens, <bos> and ASSUMED_TEXT_TOKENS."""
    return num_image_tokens + 1 + ASSUMED_TEXT_TOKENS
