"""Random-weight PaliGemma checkpoints in the exact Hub layout, for tests and benchmarks.

The layout is docs/model.md, "Checkpoint layout" and "Prompt and tokens".

What a Hub model directory holds, written offline and for any `PaliGemmaConfig` (tiny or full size):
  config.json, generation_config.json, preprocessor_config.json     (docs/model.md, "Config traps", "Prompt and tokens")
  model-0000k-of-0000n.safetensors + model.safetensors.index.json   (or model.safetensors)
  tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json
The tokenizer keeps the real id layout (docs/model.md, "Prompt and tokens") at any base size: <pad> 0, <eos> 1,
<bos> 2, <unk> 3, <mask> 4,
<start_of_turn> 106, <end_of_turn> 107, "\\n" 108, byte-fallback pieces, then <loc0000> at base_vocab,
<seg000> at base_vocab + 1024 and <image> at base_vocab + 1152 (257152 for the real 256000-piece vocabulary).

Weights are streamed: each shard file is written by hand in the safetensors format (8-byte little-endian header
length, JSON header, raw bytes) one chunk of rows (<= 16 MB of fp32) at a time, so writing a full-size 11.7 GB fp32
PaliGemma-3B needs no more memory than the imports. Values depend only on (seed, key name, chunk index): the same
checkpoint written in fp32 and bf16, or with another shard size, holds the same numbers up to rounding.

Initialisation (docs/model.md, "Making tiny test models that can fail") is chosen so tiny models generate
non-degenerate text and full-size fp16 stays finite:
matrices N(0, (scale * 1.5 / sqrt(fan_in))^2); the embedding small (the residual stream is E * sqrt(D), which
must not drown the layers' output) with the rows of pad/eos/bos/unk/"\\n"/<image> and the padding rows after
<image> zero (their tied logits stay 0 while the max over random rows is positive, so generation does not stop
at once); Gemma RMSNorm weights N(0, 0.1 scale) (applied as 1 + w); SigLIP LayerNorm weights 1 + N(0, 0.1 scale).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.safetensors_io import DEFAULT_MAX_SHARD_BYTES, WEIGHT_DTYPES, TensorSpec, dtype_name, write_sharded
from ..model.config import PaliGemmaConfig, tiny

# --- tokenizer --------------------------------------------------------------------------------------------------

HUB_BASE_VOCAB = 256000  # Gemma SentencePiece pieces; loc/seg/<image> follow (docs/model.md, "Prompt and tokens")
NUM_LOC, NUM_SEG = 1024, 128
NEWLINE_ID = 108
UNK_ID = 3
_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0-4
_TURN = ["<start_of_turn>", "<end_of_turn>"]  # ids 106, 107
_CHARS = "▁" + "".join(chr(c) for c in range(0x21, 0x7F))  # "▁" stands for the space (Gemma has no dummy prefix)
# Words that get BPE merges, with and without the leading "▁": task prefixes and common caption words.
_WORDS = (
    "the a an of on in is and with to at caption describe detect segment answer question ocr en fr de es "
    "what where who how many color cat cats dog dogs cow car bus person people man woman beach grass sky tree "
    "table red blue green white black standing sitting image picture photo"
).split()
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70 pseudo-syllables for filler pieces
MIN_BASE_VOCAB = NEWLINE_ID + 1 + 256 + len(_CHARS)


def _merge_chains(words: list[str]) -> Iterator[tuple[str, str]]:
    # A word's pieces merge left to right ("▁c"+"a" -> "▁ca", "▁ca"+"t" -> "▁cat"), so any prefix of this list
    # is a valid merge table whose operands all exist.
    seen: set[str] = set()
    for word in words:
        for form in ("▁" + word, word):
            for i in range(2, len(form) + 1):
                if form[:i] not in seen:
                    seen.add(form[:i])
                    yield form[: i - 1], form[i - 1]


def _fillers() -> Iterator[str]:
    # Pseudo-words "▁ba", "▁babe", ... so random generations decode to something readable.
    for n in itertools.count(1):
        for parts in itertools.product(_SYLLABLES, repeat=n):
            yield "▁" + "".join(parts)


def tokenizer_vocab(base_vocab: int = HUB_BASE_VOCAB) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary (ids 0..base_vocab-1) and merges of the synthetic Gemma tokenizer."""
    if base_vocab < MIN_BASE_VOCAB:
        raise ValueError(f"base_vocab {base_vocab} is too small: the Gemma id layout needs at least {MIN_BASE_VOCAB}")
    pieces = _CONTROL + [f"<unused{i}>" for i in range(106 - len(_CONTROL))] + _TURN + ["\n"]
    pieces += [f"<0x{b:02X}>" for b in range(256)] + list(_CHARS)
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for a, b in _merge_chains(_WORDS):
        if len(vocab) == base_vocab:
            break
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    fillers = _fillers()
    while len(vocab) < base_vocab:
        piece = next(fillers)
        if piece not in vocab:
            vocab[piece] = len(vocab)
    return vocab, merges


def write_preprocessor_config(out_dir: str | Path, image_size: int, image_seq_length: int) -> None:
    """The Hub `preprocessor_config.json`: RGB, bicubic resize to S x S, x/255, (x - 0.5) / 0.5.

    docs/model.md, "Prompt and tokens".
    """
    cfg = {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": image_seq_length,
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "PaliGemmaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }
    _write_json(Path(out_dir) / "preprocessor_config.json", cfg)


def write_tokenizer(
    out_dir: str | Path, base_vocab: int = HUB_BASE_VOCAB, image_size: int = 224, image_seq_length: int = 256
) -> None:
    """Tokenizer + preprocessor files that `AutoTokenizer` / `PaliGemmaProcessor.from_pretrained` load offline."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_vocab(base_vocab)
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    # Turn markers keep their vocab ids but match as whole strings (Gemma user-defined symbols); not special.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in _TURN])
    # loc/seg are ordinary added tokens so they survive decode(skip_special_tokens=True)
    # (docs/model.md, "Prompt and tokens").
    tok.add_tokens([f"<loc{i:04d}>" for i in range(NUM_LOC)] + [f"<seg{i:03d}>" for i in range(NUM_SEG)])
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]},
        replace_extra_special_tokens=False,
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    if image_id != base_vocab + NUM_LOC + NUM_SEG:  # the added-token ids follow the vocab without a gap
        raise AssertionError(f"<image> got id {image_id}, expected {base_vocab + NUM_LOC + NUM_SEG}")
    tok.save_pretrained(out)
    # transformers 5.x writes only tokenizer.json + tokenizer_config.json; the Hub repos also carry these two.
    _write_json(
        out / "special_tokens_map.json",
        {"additional_special_tokens": ["<image>"], "bos_token": "<bos>", "eos_token": "<eos>",
         "pad_token": "<pad>", "unk_token": "<unk>"},
    )  # fmt: skip
    _write_json(out / "added_tokens.json", {"<image>": image_id})
    write_preprocessor_config(out, image_size, image_seq_length)


def tokenizer_base_vocab(cfg: PaliGemmaConfig) -> int:
    """Base vocabulary of the tokenizer that goes with `cfg` (<image> is the last added token)."""
    base = cfg.image_token_index - NUM_LOC - NUM_SEG
    if base < MIN_BASE_VOCAB:
        raise ValueError(
            f"image_token_index {cfg.image_token_index} leaves no room for the Gemma id layout "
            f"(needs >= {MIN_BASE_VOCAB + NUM_LOC + NUM_SEG}); write the checkpoint with tokenizer=False"
        )
    return base


# --- weights ----------------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 22  # 16 MB of fp32 per generated chunk; part of the value definition, do not change
# Measured on the tiny configs (greedy, 16 tokens, 6 prompts x 3 seeds): gain 0.5-1.0 leaves Gemma 1 stuck on one
# token; gain 1.5 with the embedding at 0.03 RMS gives 5-16 distinct tokens per prompt for Gemma 1 and Gemma 2.
_MATRIX_GAIN = 1.5  # std = gain / sqrt(fan_in): each layer's output about 1.5x its input RMS
_EMBED_RMS = 0.03  # RMS of E * sqrt(D), the token's share of the residual stream at layer 0


def param_shapes(cfg: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Hub key -> shape, in module order, from our model built on the meta device (no memory)."""
    from ..model.paligemma import PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _seed(*parts: object) -> int:
    # Stable across runs and platforms (Python's hash() is salted per process).
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _zero_rows(cfg: PaliGemmaConfig) -> list[int]:
    ids = {cfg.pad_token_id, cfg.bos_token_id, UNK_ID, NEWLINE_ID, cfg.image_token_index, *cfg.eos_token_ids}
    return sorted(i for i in ids if i < cfg.text.vocab_size)


def _tensor_chunks(
    name: str, shape: tuple[int, ...], cfg: PaliGemmaConfig, seed: int, scale: float
) -> Iterator[torch.Tensor]:
    """fp32 values of one tensor, yielded in chunks of whole rows (dim 0) so peak memory stays ~16 MB."""
    row = math.prod(shape[1:])
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(row, 1))
    fan_in = row if len(shape) > 1 else 1
    is_embed = name.endswith("embed_tokens.weight")
    # embed: the residual stream starts at E * sqrt(D); kept small so the layers, not a copy of the input
    # token through the tied head, decide the next token (docs/model.md, "Making tiny test models that can fail").
    if is_embed:
        std = scale * _EMBED_RMS / math.sqrt(shape[1])
    elif len(shape) > 1:
        std = scale * _MATRIX_GAIN / math.sqrt(fan_in)  # matrices and conv kernels
    elif name.endswith(".bias"):
        std = scale * 0.02
    else:
        std = scale * 0.1  # norm weights
    offset = 1.0 if (name.startswith("vision_tower") and "norm" in name and name.endswith(".weight")) else 0.0
    zero = torch.tensor(_zero_rows(cfg), dtype=torch.long)
    for c, start in enumerate(range(0, shape[0], rows_per_chunk)):
        n = min(rows_per_chunk, shape[0] - start)
        g = torch.Generator().manual_seed(_seed(seed, name, c))
        x = torch.randn((n, *shape[1:]), generator=g).mul_(std).add_(offset)
        if is_embed:
            # Padding rows after <image> are never emitted by the tokenizer (docs/model.md, "Checkpoint layout"):
            # zero them too.
            x[max(0, cfg.image_token_index + 1 - start) :] = 0
            local = zero[(zero >= start) & (zero < start + n)] - start
            x[local] = 0
        yield x


def _write_json(path: Path, obj: object, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def write_checkpoint(
    out_dir: str | Path,
    cfg: PaliGemmaConfig,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    seed: int = 0,
    scale: float = 1.0,
    tokenizer: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a random-weight model directory in the Hub layout; `progress(bytes_done, bytes_total)` per tensor."""
    if dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"dtype {dtype} is not one of {', '.join(WEIGHT_DTYPES)}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", cfg.to_hf() | {"torch_dtype": dtype_name(dtype)})
    eos = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}
    _write_json(out / "generation_config.json", gen)
    if tokenizer:
        write_tokenizer(out, tokenizer_base_vocab(cfg), cfg.vision.image_size, cfg.num_image_tokens)
    else:
        write_preprocessor_config(out, cfg.vision.image_size, cfg.num_image_tokens)

    specs = [TensorSpec(name, dtype, shape) for name, shape in param_shapes(cfg).items()]
    write_sharded(out, specs, lambda s: _tensor_chunks(s.name, s.shape, cfg, seed, scale), max_shard_bytes, progress)
    return out


def tiny_checkpoint(out_dir: str | Path, gemma2: bool = False, dtype: torch.dtype = torch.float32, **kw: Any) -> Path:
    """A tiny random checkpoint (`config.tiny(gemma2)`) in ~100 KB shards, so loaders see several files."""
    kw.setdefault("max_shard_bytes", 100_000)
    return write_checkpoint(out_dir, tiny(gemma2), dtype=dtype, **kw)


# --- key-name variants (docs/model.md, "Key-name variants") -------------------------------------------------

KEY_VARIANTS = ("hub", "tf_4_52", "tf5_memory", "tf5_save")
_VISION, _PROJ, _LM = "vision_tower.vision_model.", "multi_modal_projector.", "language_model.model."
_PREFIXES = {  # variant -> (vision, projector, language model, lm_head key)
    "hub": (_VISION, _PROJ, _LM, "language_model.lm_head.weight"),
    "tf_4_52": ("model." + _VISION, "model." + _PROJ, "model.language_model.", "lm_head.weight"),
    "tf5_memory": ("model.vision_tower.", "model." + _PROJ, "model.language_model.", "lm_head.weight"),
    "tf5_save": ("vision_tower.", _PROJ, _LM, "language_model.lm_head.weight"),
}
_EMBED = _LM + "embed_tokens.weight"


def rename_key(hub_key: str, variant: str) -> str:
    """A Hub legacy key as the writer `variant` names it."""
    if variant not in _PREFIXES:
        raise ValueError(f"unknown key variant {variant!r}; expected one of {', '.join(KEY_VARIANTS)}")
    vision, proj, lm, _ = _PREFIXES[variant]
    for hub_prefix, new_prefix in ((_VISION, vision), (_PROJ, proj), (_LM, lm)):
        if hub_key.startswith(hub_prefix):
            return new_prefix + hub_key.removeprefix(hub_prefix)
    raise ValueError(f"{hub_key!r} is not a Hub PaliGemma key")


def write_key_variant(src_dir: str | Path, out_dir: str | Path, variant: str, lm_head: bool = False) -> Path:
    """Copy a (tiny) checkpoint with its tensors renamed to `variant`; `lm_head` also stores the tied head."""
    from safetensors import safe_open

    src, out = Path(src_dir), Path(out_dir)
    if variant not in _PREFIXES:
        raise ValueError(f"unknown key variant {variant!r}; expected one of {', '.join(KEY_VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy2(f, out / f.name)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    if _EMBED not in tensors:
        raise ValueError(f"{src}: no {_EMBED}; write_key_variant expects a Hub-layout checkpoint")
    renamed = {rename_key(k, variant): v for k, v in tensors.items()}
    if lm_head:
        renamed[_PREFIXES[variant][3]] = tensors[_EMBED]
    # Roughly the source's shard count, so multi-shard loading is exercised in every variant.
    n_shards = max(1, len(list(src.glob("*.safetensors"))))
    max_bytes = max(1, sum(t.nbytes for t in renamed.values()) // n_shards + 1)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in renamed.items()]
    write_sharded(out, specs, lambda s: iter([renamed[s.name]]), max_bytes)
    return out
