"""Decode speed against llama.cpp on the same machine, in the same run: PaliGemma-3B's own decoder weights.

    python -m bench.llama_cpp --llama-cpp DIR

DIR is a llama.cpp build tree holding `llama-bench` and `llama-quantize` (built from llama.cpp's sources with
cmake, `-DGGML_NATIVE=ON`, for this CPU; docs/performance.md says which sources), and llama.cpp's `gguf` Python
package must be installed (`pip install gguf`, or its sources' gguf-py): neither is a dependency of this project.
llama.cpp has no PaliGemma support, so it runs the decoder alone: the full-size synthetic PaliGemma-3B-224 bf16
checkpoint's `language_model.*` tensors written as a Gemma-2B GGUF (its architecture, "gemma": 18 layers, 2048
wide, 8 heads and 1 kv head of 256, the tied 257,216-row table), in bf16 and quantized by `llama-quantize` to Q8_0
and Q4_0 (its default mixture: the tied table stays in a wider type, as llama.cpp chooses). A synthetic vocabulary
of the same size stands in for the tokenizer (llama-bench feeds token ids; their text is never used).

Rows, each alone on the machine, the DRAM read rate measured just before and after each (bench/kernels.py):
- llama.cpp: `llama-bench -t 2 -p 0 -n 32 -r 3`: 32 tokens generated from an empty context; its mean tok/s;
- ours: bench/generate_speed.py's rows (`ours-bf16`, `ours-int8`, `ours-int4`: the whole model, 32 tokens decoded
  after a 260-token image prompt, the median of 3 in a fresh process). Our decode reads a 260-position KV cache,
  llama.cpp's an empty one: at 2 GB of weights a step, 260 positions of one 256-wide kv head are ~0.5 MB a step.
Writes docs/results/llama_cpp.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import CHECKPOINTS, ensure_checkpoint
from bench.generate_speed import THREADS
from bench.kernels import dram_read_rate
from bench.report import ROOT, command, header, md_table, set_threads, text_table, write
from bench.supervise import run_child

NEW_TOKENS = 32
ROUNDS = 2
# llama.cpp row -> (GGUF type written or quantized to, our generate_speed row of the same width)
ROWS = {"bf16": ("BF16", "ours-bf16"), "q8_0": ("Q8_0", "ours-int8"), "q4_0": ("Q4_0", "ours-int4")}


def write_gguf(source: Path, dst: Path) -> None:
    """The decoder of the PaliGemma-3B checkpoint at `source` as a bf16 Gemma GGUF (gguf-py's writer)."""
    import gguf
    import torch
    from safetensors import safe_open

    from lowmem_paligemma.model.config import load_config

    t = load_config(source).text
    w = gguf.GGUFWriter(str(dst), "gemma")
    w.add_context_length(8192)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_hidden_layers)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_attention_heads)
    w.add_head_count_kv(t.num_key_value_heads)
    w.add_key_length(t.head_dim)
    w.add_value_length(t.head_dim)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(t.vocab_size)])
    w.add_token_scores([0.0] * t.vocab_size)
    w.add_token_types([gguf.TokenType.NORMAL] * t.vocab_size)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}  # fmt: skip
    for shard in sorted(source.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if not key.startswith("language_model."):
                    continue
                rest = key.split(".", 2)[2]  # after "language_model.model.": "layers.0.self_attn.q_proj.weight"
                parts = rest.split(".")
                name = names.get(rest) or f"blk.{parts[1]}.{per_layer['.'.join(parts[2:-1])]}.weight"
                tensor = f.get_tensor(key).to(torch.bfloat16)
                if "norm" in name:  # llama.cpp's Gemma multiplies by the weight; Gemma scales by (1 + w)
                    w.add_tensor(name, (tensor.float() + 1).numpy())
                else:
                    w.add_tensor(name, tensor.view(torch.uint16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ggufs(source: Path, tools: Path) -> dict[str, Path]:
    """The three GGUFs, written once beside the checkpoints."""
    out = CHECKPOINTS / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    files = {row: out / f"paligemma-3b-224-decoder-{row}.gguf" for row in ROWS}
    if not files["bf16"].is_file():
        write_gguf(source, files["bf16"])
    for row, (kind, _) in ROWS.items():
        if not files[row].is_file():
            subprocess.run([str(tools / "llama-quantize"), str(files["bf16"]), str(files[row]), kind], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
    return files


def llama_bench(tools: Path, model: Path) -> dict:
    cmd = [str(tools / "llama-bench"), "-m", str(model), "-t", str(THREADS), "-p", "0", "-n", str(NEW_TOKENS),
           "-r", "3", "-o", "json"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    (result,) = json.loads(out.stdout)
    return {"tps": result["avg_ts"], "tps_sd": result["stddev_ts"], "bytes": result["model_size"],
            "type": result["model_type"], "build": f"{result['build_commit']} (build {result['build_number']})",
            }  # fmt: skip


def find_tools(root: Path) -> Path:
    for sub in ("build/bin", "bin", "."):
        if (root / sub / "llama-bench").is_file() and (root / sub / "llama-quantize").is_file():
            return root / sub
    raise SystemExit(f"no llama-bench and llama-quantize under {root} (build/bin, bin or the folder itself)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp build tree (llama-bench, llama-quantize)")
    args = p.parse_args(argv)
    tools = find_tools(args.llama_cpp)
    set_threads(THREADS)
    source = ensure_checkpoint("bf16")
    files = ggufs(source, tools)
    out_dir = ROOT / "out" / "llama_cpp"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, build = [], ""
    for round_ in range(1, ROUNDS + 1):  # the VM's memory rate drifts: each pair twice, in turn
        for row, (_, ours) in ROWS.items():
            print(f"round {round_}: llama.cpp {row} and {ours} ...", file=sys.stderr, flush=True)
            before = dram_read_rate()
            theirs = llama_bench(tools, files[row])
            build = theirs["build"]
            middle = dram_read_rate()
            c = run_child("bench.generate_speed", ["--child", ours, "--checkpoint", str(source)],
                          out_dir / f"{ours}.json", out_dir / f"{ours}.log", timeout_s=1800)  # fmt: skip
            if c.status != "ok":
                raise SystemExit(f"{ours}: {c.status} {c.note}")
            r = c.result
            ours_rate = r["read_bytes"] * r["decode_tps"]
            theirs_rate = theirs["bytes"] * theirs["tps"]  # the file's bytes: what a step reads
            rows.append([round_, f"llama.cpp {theirs['type']}", f"{theirs['tps']:.2f} (sd {theirs['tps_sd']:.2f})",
                         f"{theirs['bytes'] / 1e9:.2f}", f"{theirs_rate / 1e9:.1f}",
                         f"{before / 1e9:.1f} / {middle / 1e9:.1f}", f"{theirs_rate / ((before + middle) / 2):.0%}",
                         "-"])  # fmt: skip
            rows.append([round_, f"ours {ours.removeprefix('ours-')}", f"{r['decode_tps']:.2f}",
                         f"{r['read_bytes'] / 1e9:.2f}", f"{ours_rate / 1e9:.1f}",
                         " / ".join(f"{d / 1e9:.1f}" for d in r["drams"]), f"{ours_rate / r['dram']:.0%}",
                         f"{r['decode_tps'] / theirs['tps']:.2f}x"])  # fmt: skip
            print(f"  llama.cpp {theirs['tps']:.2f} tok/s, ours {r['decode_tps']:.2f} tok/s", file=sys.stderr)
    cols = ("round", "decoder", "decode tok/s", "weights a step reads (GB)", "GB/s", "DRAM read around the row (GB/s)",
            "of DRAM", "ours / llama.cpp")  # fmt: skip
    print(text_table(cols, rows))
    what = (f"PaliGemma-3B-224's decoder (full-size synthetic bf16 checkpoint) in llama.cpp {build} "
            f"(llama-bench, {THREADS} threads, {NEW_TOKENS} tokens, mean of 3) and ours (bench/generate_speed.py "
            f"rows, median of 3); each row alone, the DRAM read rate measured around each; {ROUNDS} rounds."
            )  # fmt: skip
    write(
        "llama_cpp", header("Decode against llama.cpp", command("bench.llama_cpp", argv), what) + md_table(cols, rows)
    )


if __name__ == "__main__":
    main()
