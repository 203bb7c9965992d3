"""load_model and generation on a CUDA GPU: the answers of the CPU and of transformers on the same GPU.

Skipped where there is no GPU (CI has none). On a lent GPU `python -m bench.cuda` runs this file first and records
its result in docs/results/cuda.md. The tiny checkpoints are transformers' own (hf_reference.py), so a GPU path
that drops a soft-cap, a (1 + w) norm or the prefix mask moves the logits by whole units, far past the tolerances.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from click.testing import CliRunner
from hf_reference import hf_load, prompt_inputs, write_hf_checkpoint
from PIL import Image

from lowmem_paligemma import InsufficientMemoryError, LoadOptions, SamplingOptions, load_model, load_session
from lowmem_paligemma.checkpoint import preflight
from lowmem_paligemma.cli import main
from lowmem_paligemma.model.config import tiny
from lowmem_paligemma.model.gemma import KVCache
from lowmem_paligemma.model.generate import decode_rows, encode_image, generate, prefill
from lowmem_paligemma.pretrained.synth import tiny_checkpoint
from lowmem_paligemma.runtime.server.engine import Engine, Request
from lowmem_paligemma.runtime.session import run_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Ours and transformers both run cuBLAS on the GPU, but not the same products in the same order (fused q/k/v,
# SDPA backends): float32 agrees to rounding; bfloat16 to bfloat16 noise, amplified by the x3 test weights as on
# the CPU (tests/model/test_paligemma.py allows 0.3 against transformers' eager path there).
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 0.5}


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def checkpoint(request, tmp_path_factory):
    cfg = tiny(gemma2=request.param == "gemma2")
    return cfg, write_hf_checkpoint(cfg, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_on_cuda_match_transformers_on_cuda(checkpoint, dtype):
    cfg, path = checkpoint
    ids, tt, am, pv = (t.cuda() for t in prompt_inputs(cfg))
    ref = hf_load(path, dtype, attn=None).cuda()
    loaded = load_model(path, dtype=dtype, device="cuda")
    assert loaded.model.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in loaded.model.parameters())
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pv.to(dtype), token_type_ids=tt, attention_mask=am).logits.float()
        got = loaded.model(ids, pv, tt, am).float()
    assert want.abs().max() > 1.0  # not a degenerate model
    assert (got - want).abs().max().item() <= TOLERANCE[dtype]


def test_float32_logits_on_cuda_match_the_cpu(checkpoint):
    cfg, path = checkpoint
    ids, tt, am, pv = prompt_inputs(cfg)
    with torch.no_grad():
        cpu = load_model(path, dtype=torch.float32, device="cpu").model(ids, pv, tt, am)
        gpu = load_model(path, dtype=torch.float32, device="cuda").model(ids.cuda(), pv, tt.cuda(), am.cuda())
    assert (gpu.cpu() - cpu).abs().max().item() <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_on_cuda_holds_the_cpus_bytes_and_logits(checkpoint, quantize):
    """Quantized while streaming (on the CPU, as the rows pass) into the GPU: the bytes equal a CPU load's; the
    reference kernels (dequantized per layer, then cuBLAS) give the CPU's logits to rounding."""
    cfg, path = checkpoint
    ids, tt, am, pv = prompt_inputs(cfg)
    cpu = load_model(path, dtype=torch.float32, quantize=quantize, device="cpu", kernels="reference").model
    gpu = load_model(path, dtype=torch.float32, quantize=quantize, device="cuda").model
    want, got = dict(cpu.named_parameters()), dict(gpu.named_parameters())
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k].cpu()) for k in want)
    with torch.no_grad():
        a = cpu(ids, pv, tt, am)
        b = gpu(ids.cuda(), pv, tt.cuda(), am.cuda()).cpu()
    assert (a - b).abs().max().item() <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_greedy_tokens_on_cuda_equal_the_cpus(checkpoint, quantize):
    cfg, path = checkpoint
    ids, _, _, pv = prompt_inputs(cfg, batch=1, text=4)
    tokens = {}
    for device in ("cpu", "cuda"):
        model = load_model(path, dtype=torch.float32, quantize=quantize, device=device, kernels="reference").model
        tokens[device] = [int(t) for t in generate(model, ids, pixel_values=pv, max_new_tokens=12, eos_token_ids=[])]
    assert len(tokens["cpu"]) == 12
    assert tokens["cuda"] == tokens["cpu"]


def test_requests_decoded_together_on_cuda_give_the_cpus_tokens(checkpoint):
    """The server's continuous batching (generate.decode_rows: each request with its own cache and mask) on the GPU:
    two requests of different lengths, the second joining a step later, get the tokens each gets alone on the CPU."""
    cfg, path = checkpoint
    prompts = [prompt_inputs(cfg, batch=1, text=t) for t in (4, 9)]
    alone = []
    cpu = load_model(path, dtype=torch.float32, device="cpu").model
    for ids, tt, _, pv in prompts:
        alone.append([int(t) for t in generate(cpu, ids, tt, pixel_values=pv, max_new_tokens=6, eos_token_ids=[])])
    gpu = load_model(path, dtype=torch.float32, device="cuda").model
    caches, slots, tokens, out = [], [], [], [[], []]
    for step in range(7):
        if step < 2:  # request `step` joins: its prefill, then it decodes with the others
            ids, tt, _, pv = prompts[step]
            cache = KVCache(gpu.cfg.text, 1, ids.shape[1] + 6, torch.float32, "cuda")
            logits = prefill(gpu, ids.cuda(), tt.cuda(), encode_image(gpu, pv), cache)
            caches.append(cache), slots.append(ids.shape[1]), tokens.append(int(logits.argmax(-1)))
            out[step].append(tokens[-1])
        active = [i for i in range(len(caches)) if len(out[i]) < 6]
        if not active:
            break
        logits = decode_rows(gpu, [tokens[i] for i in active], [caches[i] for i in active], [slots[i] for i in active])
        assert logits.device.type == "cuda"
        for row, i in enumerate(active):
            tokens[i] = int(logits[row].argmax())
            out[i].append(tokens[i])
            slots[i] += 1
    assert out == alone


def test_the_servers_engine_on_cuda_gives_each_request_the_cpus_answer(tmp_path):
    """Requests submitted together to the server's engine (prefill from the processor's CPU tensors, then decoded
    together) on the GPU: each request's tokens are its tokens alone on the CPU."""
    path = tiny_checkpoint(tmp_path / "tiny", gemma2=True)
    cpu = load_session(path, LoadOptions(dtype="float32", device="cpu"))
    gpu = load_session(path, LoadOptions(dtype="float32", device="cuda"))
    g = torch.Generator().manual_seed(5)
    images = [Image.fromarray(torch.randint(0, 256, (24, 32, 3), generator=g, dtype=torch.uint8).numpy()) for _ in "ab"]
    asks = [("caption en", 8), ("ocr", 5), ("answer en what is this?", 11)]
    requests = [Request(images[i % 2], f"image {i % 2}", p, SamplingOptions(max_new_tokens=n))
                for i, (p, n) in enumerate(asks)]  # fmt: skip
    alone = [run_prompt(cpu, cpu.encode(r.image), r.prompt, r.sampling).token_ids for r in requests]
    engine = Engine(gpu, parallel=4, max_queue=4)
    engine.start()

    async def collect(ticket):
        async for event in ticket.events():
            result, error = event.result, event.error
        return result, error

    async def main():
        return await asyncio.gather(*(collect(engine.submit(r)) for r in requests))

    try:
        got = asyncio.run(asyncio.wait_for(main(), timeout=120))
    finally:
        engine.stop()
    assert [error for _, error in got] == [None] * len(requests)
    assert [result.token_ids for result, _ in got] == alone


def test_the_cli_generates_on_cuda_what_it_generates_on_the_cpu(tmp_path):
    path = tiny_checkpoint(tmp_path / "tiny", gemma2=True)
    image = tmp_path / "a.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (40, 30, 3), generator=g, dtype=torch.uint8).numpy()).save(image)
    out = {}
    for device in ("cpu", "cuda"):
        result = CliRunner().invoke(main, ["generate", str(path), str(image), "caption en", "--device", device,
                                           "--dtype", "float32", "--max-new-tokens", "8"])  # fmt: skip
        assert result.exit_code == 0, (result.output, result.exception)
        out[device] = result.stdout
    assert out["cuda"] == out["cpu"] and out["cpu"].strip()


def test_a_load_larger_than_the_gpus_free_memory_is_refused_before_it_starts(tmp_path, monkeypatch):
    path = tiny_checkpoint(tmp_path / "tiny", gemma2=False)
    before = torch.cuda.memory_allocated()
    monkeypatch.setattr(preflight.torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))
    with pytest.raises(InsufficientMemoryError, match="of cuda memory"):
        load_model(path, dtype=torch.float32, device="cuda")
    assert torch.cuda.memory_allocated() == before  # nothing was allocated on the GPU
