"""`make demo`: write a full-size synthetic PaliGemma-3B checkpoint (once) and stream it into float16.

Prints the load time and the peak RSS with its anon / file-backed split, sampled during the load, then
answers one prompt about a generated image (random weights: the words are noise; the timings are real).
"""

from __future__ import annotations

import time

import torch
from PIL import Image

from bench.common import ensure_checkpoint, gb
from lowmem_paligemma.generate import generate
from lowmem_paligemma.pretrained import load_hf_model
from lowmem_paligemma.processor import Processor, TextStream
from lowmem_paligemma.profiler import MemoryProfiler, current_rss


def main() -> None:
    path = ensure_checkpoint("fp32")
    with MemoryProfiler(interval=0.05) as prof:
        t0 = time.perf_counter()
        model, tokenizer = load_hf_model(path, device="cpu", dtype=torch.float16)
        seconds = time.perf_counter() - t0
        prof.mark("done")
    peak, final = prof.peak(), prof.timeline().samples[-1]
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"checkpoint : {path} (float32, {len(list(path.glob('*.safetensors')))} shards)")
    print(f"model      : {n_params:,} params, float16, {gb(model_bytes)} GB; tokenizer {len(tokenizer):,} tokens")
    print(f"load time  : {seconds:.1f} s")
    print(f"peak RSS   : {gb(peak.rss)} GB (anon {gb(peak.anon)}, file {gb(peak.file)}); VmHWM {gb(peak.hwm)} GB")
    print(f"final RSS  : {gb(final.rss)} GB (anon {gb(final.anon)}, file {gb(final.file)})")

    processor = Processor.from_pretrained(path, model.cfg)
    image = Image.radial_gradient("L").convert("RGB").resize((640, 480))
    inputs = processor(image, "caption en")
    stream = TextStream(tokenizer)
    print("generate   : 'caption en' ->", end=" ", flush=True)
    t0 = time.perf_counter()
    tokens = generate(model, inputs["input_ids"], inputs["token_type_ids"], pixel_values=inputs["pixel_values"],
                      max_new_tokens=12, eos_token_ids=[])  # fmt: skip
    n = 0
    for token in tokens:
        print(stream.push(token), end="", flush=True)
        n += 1
    print(stream.flush(), end="")
    rss = current_rss()
    print(f"\n             {n} tokens in {time.perf_counter() - t0:.1f} s (float16 weights on CPU, prefill included); "
          f"RSS {gb(rss['rss'])} GB (anon {gb(rss['anon'])}, file {gb(rss['file'])})")  # fmt: skip


if __name__ == "__main__":
    main()
