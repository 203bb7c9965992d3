"""Seeded mutations of a checkpoint (shard headers, index, config.json) and of image files, and their verdicts.

A checkpoint case copies a pristine tiny checkpoint, applies one mutation chosen by its seed, loads it in float32
and runs one forward pass on a fixed prompt. The verdict is one of
- refused: a `LowmemError` (the project's own one-line errors);
- identical: the logits equal the pristine model's bit for bit;
- as configured: config.json now describes another valid model (the parsed config differs) and that is what loads;
- wrong: anything else, a different model from the same config or another exception type. Must never happen.
An image case mutates the bytes of a small PNG / JPEG / WebP / GIF / BMP and calls `load_image` and
`Processor.pixel_values`: either they work, or they raise `ImageError` (anything else is wrong).

Mutations of tensor *data* bytes are not made: a valid header over changed weights is a valid checkpoint of
another model, which only checksums can tell apart (docs/reliability.md, verify.py).

tests/checkpoint/test_fuzz.py runs a few hundred cases in `make test`; `make fuzz` runs thousands through
`python tests/fuzzing.py` and writes docs/results/fuzz.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import random
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lowmem_paligemma.checkpoint.safetensors_io import INDEX_NAME
from lowmem_paligemma.errors import ImageError, LowmemError
from lowmem_paligemma.model import config, processor
from lowmem_paligemma.model.config import from_hf
from lowmem_paligemma.model.processor import Processor, load_image
from lowmem_paligemma.pretrained import load as pretrained
from lowmem_paligemma.pretrained.synth import tiny_checkpoint

VERDICTS = ("refused", "identical", "as configured", "wrong")
ODD_VALUES = [None, 0, -1, 1, 2, "x", "", True, False, 1.5, -0.5, 10**12, 2**64, [], {}, [1], {"a": 1}, float("inf")]


@dataclass(frozen=True)
class Outcome:
    target: str  # what was mutated: "header", "index", "config" or "image"
    mutation: str  # what was done, readable
    verdict: str  # one of VERDICTS (images: "refused", "identical" for "decoded", or "wrong")
    detail: str = ""  # the error message or what went wrong


# --- checkpoint mutations ---------------------------------------------------------------------------------------------


def _split(raw: bytes) -> tuple[int, bytes, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8 : 8 + n], raw[8 + n :]


def _header_bytes(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    """Edits of the raw bytes: the 8 length bytes, or the JSON text (keeping or fixing the declared length)."""
    n, header, data = _split(raw)
    kind = rng.randrange(7)
    if kind <= 1:  # a few bytes short: the JSON still parses when they are padding spaces
        k = rng.choice([d for d in range(-8, 9) if d])
        return struct.pack("<Q", max(0, n + k)) + header + data, f"declared header length {k:+d}"
    if kind == 2:
        i, b = rng.randrange(8), rng.randrange(256)
        head = bytearray(raw[:8])
        head[i] = b
        return bytes(head) + raw[8:], f"length byte {i} set to {b}"
    text = bytearray(header)
    i = rng.randrange(len(text))
    if kind == 3:
        text[i] = rng.randrange(256)
        what = f"header byte {i} set to {text[i]}"
    elif kind == 4:
        text[i] = ord(rng.choice(b'0123456789{}[],:" \tFIBU'.decode()))
        what = f"header byte {i} set to {chr(text[i])!r}"
    elif kind == 5:
        del text[i : i + rng.randint(1, 8)]
        what = f"header bytes deleted at {i}"
    else:
        text[i:i] = bytes(rng.randrange(32, 127) for _ in range(rng.randint(1, 8)))
        what = f"header bytes inserted at {i}"
    if rng.random() < 0.5:
        return struct.pack("<Q", n) + bytes(text) + data, what + ", declared length kept"
    return struct.pack("<Q", len(text)) + bytes(text) + data, what + ", declared length fixed"


def _header_json(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    """Edits of the parsed header: offsets, dtypes, shapes, names, entries, metadata; written back padded."""
    _, header, data = _split(raw)
    h = json.loads(header)
    keys = [k for k in h if k != "__metadata__"]
    key = rng.choice(keys)
    entry = h[key]
    kind = rng.randrange(9)
    if kind == 0:
        i, k = rng.randrange(2), rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 10**9])
        entry["data_offsets"][i] += k
        what = f"{key} data_offsets[{i}] {k:+d}"
    elif kind == 1:
        entry["data_offsets"] = rng.choice([entry["data_offsets"][::-1], h[rng.choice(keys)]["data_offsets"],
                                            [0, 0], entry["data_offsets"] + [0], "0,4", None])  # fmt: skip
        what = f"{key} data_offsets -> {entry['data_offsets']!r}"
    elif kind == 2:
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "U32", "F8_E4M3", "f", 4])
        what = f"{key} dtype -> {entry['dtype']!r}"
    elif kind == 3:
        shape = entry["shape"]
        options = [shape[::-1], shape + [1], shape[:-1], [1] + shape, [d + 1 for d in shape], [], [True] * len(shape)]
        options += [[-d for d in shape], [float(d) for d in shape], [str(d) for d in shape]]
        if shape:
            options += [[shape[0] * 2, *shape[1:]], [*shape[:-1], shape[-1] // 2 or 1, 2]]
        entry["shape"] = rng.choice(options)
        what = f"{key} shape -> {entry['shape']!r}"
    elif kind == 4:
        other = rng.choice(keys)
        new = rng.choice([other, key + "x", key.replace("layers.0", "layers.1"), key.upper(), "", "__metadata__"])
        h = {new if k == key else k: v for k, v in h.items()}
        what = f"{key} renamed {new!r}"
    elif kind == 5:
        del h[key]
        what = f"{key} removed"
    elif kind == 6:
        h[rng.choice(["extra.weight", key + ".copy"])] = copy.deepcopy(entry)
        what = f"entry copied from {key}"
    elif kind == 7:
        h["__metadata__"] = rng.choice([None, {"format": 1}, {"format": None}, [], "pt", {"format": "np"}, {}])
        what = f"__metadata__ -> {h['__metadata__']!r}"
    else:
        h[key] = rng.choice([None, [], "x", {"dtype": entry["dtype"]}, {**entry, "extra": 1}])
        what = f"{key} -> {str(h[key])[:40]}"
    text = json.dumps(h).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data, what


def _index(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    kind = rng.randrange(8)
    if kind == 0:
        text = bytearray(raw)
        i = rng.randrange(len(text))
        text[i] = rng.randrange(256)
        return bytes(text), f"index byte {i} set to {text[i]}"
    if kind == 1:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"index truncated at {cut}"
    d = json.loads(raw)
    wm = d["weight_map"]
    key = rng.choice(sorted(wm))
    shards = sorted(set(wm.values()))
    if kind == 2:
        wm[key] = rng.choice([s for s in shards if s != wm[key]] or shards)
        what = f"{key} moved to {wm[key]}"
    elif kind == 3:
        del wm[key]
        what = f"{key} removed"
    elif kind == 4:
        wm[rng.choice(["ghost.weight", key + ".x"])] = rng.choice(shards + ["model-99999.safetensors"])
        what = "a key added"
    elif kind == 5:
        wm[key] = rng.choice([None, 1, [], "../" + wm[key], "/etc/passwd", "", "."])
        what = f"{key} -> {wm[key]!r}"
    elif kind == 6:
        d["weight_map"] = rng.choice([None, [], "x", {}])
        what = f"weight_map -> {d['weight_map']!r}"
    else:
        d.setdefault("metadata", {})["total_size"] = rng.choice([0, -1, None, "x", 10**15])
        what = f"metadata.total_size -> {d['metadata']['total_size']!r}"
    return json.dumps(d).encode(), what


def _config_fields(d: dict[str, Any]) -> list[tuple[str | None, str]]:
    fields: list[tuple[str | None, str]] = [(None, k) for k in d]
    for sub in ("text_config", "vision_config"):
        if isinstance(d.get(sub), dict):
            fields += [(sub, k) for k in d[sub]]
    return fields + [("text_config", k) for k in ("rope_parameters", "layer_types", "rope_scaling")]


def _config(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    if rng.random() < 0.15:
        text = bytearray(raw)
        i = rng.randrange(len(text))
        text[i] = ord(rng.choice('0123456789-.e{}[]:," nultr'))
        return bytes(text), f"config byte {i} set to {chr(text[i])!r}"
    d = json.loads(raw)
    where, key = rng.choice(_config_fields(d))
    obj = d if where is None else d[where]
    old = obj.get(key)
    name = key if where is None else f"{where}.{key}"
    if rng.random() < 0.1:
        obj.pop(key, None)
        return json.dumps(d).encode(), f"{name} removed"
    values = list(ODD_VALUES)
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        values += [old * 2, old + 1, old - 1, old / 2, -old]
    obj[key] = rng.choice(values)
    return json.dumps(d, allow_nan=True).encode(), f"{name}: {old!r} -> {obj[key]!r}"


def mutate_checkpoint(work: Path, rng: random.Random) -> tuple[str, str]:
    """Apply one mutation to the checkpoint directory `work` in place; (target, description)."""
    target = rng.choice(["header", "header", "header", "index", "config", "config"])
    if target == "header":
        shard = rng.choice(sorted(work.glob("*.safetensors")))
        edit = _header_bytes if rng.random() < 0.5 else _header_json
        blob, what = edit(rng, shard.read_bytes())
        shard.write_bytes(blob)
        return target, f"{shard.name}: {what}"
    path = work / (INDEX_NAME if target == "index" else "config.json")
    blob, what = (_index if target == "index" else _config)(rng, path.read_bytes())
    path.write_bytes(blob)
    return target, what


# --- running checkpoint cases -------------------------------------------------------------------------------------


class CheckpointFuzzer:
    """A pristine tiny checkpoint, its reference logits, and one verdict per seed."""

    def __init__(self, root: Path, gemma2: bool = False, load_tokenizer: bool = False):
        self.pristine = tiny_checkpoint(root / "pristine", gemma2=gemma2)
        self.work = root / "work"
        self.config = json.loads((self.pristine / "config.json").read_text())
        self.load_tokenizer = load_tokenizer
        self.tokenizer = processor.load_tokenizer(self.pristine)
        g = torch.Generator().manual_seed(0)
        self.text = torch.randint(300, 500, (1, 6), generator=g)
        size = from_hf(self.config).vision.image_size
        self.pixels = torch.randn(1, 3, size, size, generator=g)
        self.reference = self.logits(self.load(self.pristine))

    def load(self, model_dir: Path) -> Any:
        if self.load_tokenizer:
            return pretrained.load_hf_model(model_dir, dtype=torch.float32)[0]
        # The same checks without reloading the tokenizer, whose files are never mutated (saves 30 ms a case).
        processor.check_tokenizer(self.tokenizer, config.load_config(model_dir), model_dir)
        return pretrained.load_model(model_dir, dtype=torch.float32).model

    def logits(self, model: Any) -> torch.Tensor:
        """One forward pass on a fixed prompt laid out by the loaded model's own config."""
        cfg = model.cfg
        image = torch.full((1, cfg.num_image_tokens), cfg.image_token_index)
        ids = torch.cat([image, torch.tensor([[cfg.bos_token_id]]), self.text], 1)
        with torch.inference_mode():
            return model(ids, pixel_values=self.pixels, token_type_ids=torch.zeros_like(ids))

    def case(self, seed: int) -> Outcome:
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.pristine, self.work)
        target, what = mutate_checkpoint(self.work, random.Random(seed))
        try:
            model = self.load(self.work)
        except LowmemError as e:
            return Outcome(target, what, "refused", str(e).replace(str(self.work) + "/", ""))
        except Exception as e:  # noqa: BLE001 - the point: any other exception type is a finding
            return Outcome(target, what, "wrong", f"{type(e).__name__}: {e}")
        try:
            got = self.logits(model)
        except Exception as e:
            return Outcome(target, what, "wrong", f"forward failed: {type(e).__name__}: {e}")
        if got.shape == self.reference.shape and torch.equal(got, self.reference):
            return Outcome(target, what, "identical")
        if target == "config" and self._config_changed():
            return Outcome(target, what, "as configured")
        return Outcome(target, what, "wrong", "loaded a different model from the same config")

    def _config_changed(self) -> bool:
        return from_hf(json.loads((self.work / "config.json").read_text())) != from_hf(self.config)


# --- image cases --------------------------------------------------------------------------------------------------

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def image_seeds() -> dict[str, bytes]:
    """Small valid files of each format (an animated GIF among them) to mutate."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    out = {}
    for fmt in IMAGE_FORMATS:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    frames = [Image.fromarray(np.roll(pixels, i, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out["GIF-animated"] = buf.getvalue()
    return out


def mutate_image(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        cut = rng.randrange(len(b))
        return bytes(b[:cut]), f"truncated to {cut} bytes"
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), "bytes changed"
    if kind == 2:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return bytes(b), f"bytes inserted at {i}"
    if kind == 3:
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 64)]
        return bytes(b), f"bytes deleted at {i}"
    i = rng.randrange(min(len(b), 64))  # the header: sizes, modes, chunk lengths
    b[i] = rng.choice([0, 255, b[i] ^ 0x80, b[i] + 1 & 255])
    return bytes(b), f"header byte {i} changed"


def image_case(processor: Processor, seeds: dict[str, bytes], path_stem: Path, seed: int) -> Outcome:
    rng = random.Random(seed)
    name = rng.choice(sorted(seeds))
    data, what = mutate_image(rng, seeds[name])
    path = path_stem.with_suffix("." + name.split("-")[0].lower())
    path.write_bytes(data)
    what = f"{name}: {what}"
    try:
        x = processor.pixel_values(load_image(path))
    except ImageError as e:
        return Outcome("image", what, "refused", str(e))
    except Exception as e:
        return Outcome("image", what, "wrong", f"{type(e).__name__}: {e}")
    if x.shape != (1, 3, processor.image_size, processor.image_size) or not bool(torch.isfinite(x).all()):
        return Outcome("image", what, "wrong", f"pixel values {tuple(x.shape)}, finite: {bool(x.isfinite().all())}")
    return Outcome("image", what, "identical")  # decoded: the verdict names the outcome, not a comparison


def tiny_processor(model_dir: Path) -> Processor:
    """A processor without a tokenizer: image cases need only the image size."""
    cfg = from_hf(json.loads((model_dir / "config.json").read_text()))
    return Processor(None, cfg.vision.image_size, cfg.num_image_tokens, cfg.image_token_index, 2, 1)


# --- the big run: `make fuzz` ------------------------------------------------------------------------------------


def run(cases: int, images: int, root: Path, load_tokenizer: bool, progress: bool = True) -> list[Outcome]:
    outcomes = []
    for gemma2 in (False, True):
        fuzzer = CheckpointFuzzer(root / ("pg2" if gemma2 else "pg1"), gemma2, load_tokenizer)
        for seed in range(cases // 2):
            outcomes.append(fuzzer.case(seed + (10**6 if gemma2 else 0)))
            if progress and seed % 200 == 0:
                print(f"{'pg2' if gemma2 else 'pg1'}: {seed} / {cases // 2}", file=sys.stderr, flush=True)
    processor, seeds = tiny_processor(root / "pg1" / "pristine"), image_seeds()
    outcomes += [image_case(processor, seeds, root / "image", seed) for seed in range(images)]
    return outcomes


def report(outcomes: list[Outcome], command: str, seconds: float) -> str:
    from lowmem_paligemma.machine import cpu

    counts = Counter((o.target, o.verdict) for o in outcomes)
    targets = sorted({o.target for o in outcomes}, key=["header", "index", "config", "image"].index)
    lines = [
        "# Fuzzing: malformed checkpoints and images",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- CPU: {cpu().describe()}",
        f"- cases: {len(outcomes)} in {seconds:.0f} s (tests/fuzzing.py; seeds 0.. for PaliGemma, 1000000.. for"
        " PaliGemma 2 tiny checkpoints, 0.. for images)",
        "",
        "Each checkpoint case applies one seeded mutation to a tiny checkpoint's shard headers, index or config.json,",
        "loads it with `load_hf_model(dir, dtype=torch.float32)` and compares the logits of one forward pass with the",
        "unmutated model's. Each image case mutates a small PNG / JPEG / WebP / GIF / BMP file and calls `load_image`",
        "and `Processor.pixel_values`.",
        "",
        "| target | cases | refused (LowmemError) | loaded, identical logits | loaded as configured | anything else |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        n = sum(counts[(t, v)] for v in VERDICTS)
        row = [counts[(t, v)] for v in VERDICTS]
        if t == "image":  # decoded images have no reference to compare with
            lines.append(f"| image | {n} | {row[0]} (ImageError) | {row[1]} decoded | - | {row[3]} |")
        else:
            lines.append(f"| {t} | {n} | {row[0]} | {row[1]} | {row[2]} | {row[3]} |")
    total = [sum(counts[(t, v)] for t in targets) for v in VERDICTS]
    lines.append(f"| **all** | {len(outcomes)} | {total[0]} | {total[1]} | {total[2]} | **{total[3]}** |")
    lines += [
        "",
        '"Loaded as configured": config.json was changed into another valid configuration (e.g. a different',
        "`rms_norm_eps`), the parsed config differs from the original and the model it describes is what loaded.",
        '"Anything else" must be 0: a different model from an unchanged config, or an exception that is not the',
        "project's own. Tensor data bytes are not mutated: see docs/reliability.md for why only checksums catch that.",
    ]
    wrong = [o for o in outcomes if o.verdict == "wrong"]
    if wrong:
        lines += ["", "## Anything else", ""] + [f"- {o.target}: {o.mutation}: {o.detail}" for o in wrong[:50]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=4000, help="checkpoint cases (half PaliGemma, half PaliGemma 2)")
    ap.add_argument("--images", type=int, default=4000, help="image cases")
    ap.add_argument("--out", type=Path, default=Path("docs/results/fuzz.md"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = run(args.cases, args.images, Path(tmp), load_tokenizer=True)
    command = f"python tests/fuzzing.py --cases {args.cases} --images {args.images}"
    text = report(outcomes, command, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if any(o.verdict == "wrong" for o in outcomes):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
