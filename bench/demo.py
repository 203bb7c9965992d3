"""`make demo`: write a full-size synthetic PaliGemma-3B checkpoint (once), load it as the CLI does, answer once.

The checkpoint is float32 in 3 shards, as the Hub's main branch; it streams into the CLI's default dtype (the
16-bit dtype measured fastest on this machine). Prints the load time and the peak RSS with its anon /
file-backed split, then one answer about a generated image through the same runtime the CLI uses (random
weights: the words are noise; the timings and memory are real).
"""

from __future__ import annotations

from PIL import Image

from bench.common import ensure_checkpoint
from bench.report import gb
from lowmem_paligemma import LoadOptions, SamplingOptions, load_session, run_prompt
from lowmem_paligemma.profiling.profiler import MemoryProfiler, current_rss


def main() -> None:
    path = ensure_checkpoint("fp32")
    with MemoryProfiler(interval=0.05) as prof:
        session = load_session(path, LoadOptions(), progress=True)
    peak, final = prof.peak(), current_rss()
    n_params = sum(p.numel() for p in session.model.parameters())
    shards = len(list(path.glob("*.safetensors")))
    print(f"checkpoint : {path} (float32, {shards} shards)")
    print(f"model      : {n_params:,} parameters in {session.dtype}, {gb(session.weight_bytes)} GB")
    print(f"load time  : {session.load_s:.1f} s")
    print(f"peak RSS   : {gb(peak.hwm or peak.rss)} GB (anon {gb(peak.anon)}, file {gb(peak.file)})")
    print(f"final RSS  : {gb(final['rss'])} GB (anon {gb(final['anon'])}, file {gb(final['file'])})")
    print("kernels    : " + "; ".join(session.loaded.kernels.lines()))
    image = Image.radial_gradient("L").convert("RGB").resize((640, 480))
    print("generate   : 'caption en' ->", end="", flush=True)
    gen = run_prompt(session, session.encode(image), "caption en", SamplingOptions(max_new_tokens=12),
                     on_text=lambda piece: print(piece, end="", flush=True))  # fmt: skip
    rss = current_rss()
    print(f"\n             prefill {gen.prefill_s:.2f} s, {len(gen.token_ids)} tokens, decode "
          f"{gen.tokens_per_s or 0:.1f} tokens/s; RSS {gb(rss['rss'])} GB (anon {gb(rss['anon'])}, "
          f"file {gb(rss['file'])})")  # fmt: skip


if __name__ == "__main__":
    main()
