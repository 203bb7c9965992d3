"""The weight-format registry: a new format declared in this file alone (int8 in groups of 64 along the input) is
taken by every part of the project that deals in formats, with no change anywhere else: option validation and the
CLI, the quantizing layer policy and the stream (quantized chunk by chunk), the kernel chooser, the memory
estimates and the residency plan, convert's compressed-tensors writer and reader."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from lowmem_paligemma import LoadOptions, OptionError, load_model
from lowmem_paligemma.checkpoint import preflight
from lowmem_paligemma.checkpoint.loader import RowFill
from lowmem_paligemma.checkpoint.safetensors_io import FLOAT_DTYPES, read_checkpoint
from lowmem_paligemma.cli import main
from lowmem_paligemma.formats import chooser, registry
from lowmem_paligemma.formats.base import CompressedScheme, KernelChoice, Scratch, WeightFormat, round_scale_up
from lowmem_paligemma.formats.compressed import parse_quantization_config
from lowmem_paligemma.formats.int8 import Int8Linear
from lowmem_paligemma.model.generate import generate
from lowmem_paligemma.pretrained.convert import convert_checkpoint

G = 64  # the toy's group size


def quantize_g64(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n, I) -> q (n, I) int8, scale (n, I / G) in dtype."""
    n, i = w.shape
    g = w.float().view(n, i // G, G)
    scale = round_scale_up(g.abs().amax(2) / 127, dtype)
    return torch.round(g / scale[..., None]).clamp_(-127, 127).to(torch.int8).view(n, i), scale.to(dtype)


class Int8G64Linear(nn.Module):
    FORMAT = "int8g64"
    kernels = KernelChoice("dequant", "dequant")

    def __init__(self, in_features: int, out_features: int, bias: bool, scratch: Scratch | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, in_features // G), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        o, i = self.weight.shape
        return (self.weight.view(o, i // G, G).to(dtype) * self.weight_scale[..., None].to(dtype)).view(o, i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.pick(x.shape[:-1].numel()) == "float32":  # the other candidate: products in float32
            return F.linear(x.float(), self.dequantized(torch.float32), None).to(x.dtype) + (
                0 if self.bias is None else self.bias
            )
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def row_fills(self) -> dict[str, RowFill]:
        shape = (self.out_features, self.in_features)
        return {"weight": RowFill(shape, self._fill, ("weight", "weight_scale"), dtypes=FLOAT_DTYPES)}

    def _fill(self, rows: torch.Tensor, start: int) -> None:
        q, scale = quantize_g64(rows, self.weight_scale.dtype)
        self.weight[start : start + len(q)] = q
        self.weight_scale[start : start + len(q)] = scale


class Int8G64Embedding(Int8G64Linear):
    def __init__(self, rows: int, dim: int):
        super().__init__(dim, rows, bias=False)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantized(self.weight_scale.dtype))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


class Int8G64(WeightFormat):
    name = "int8g64"
    decode_kernels = ("dequant", "float32")
    prefill_kernels = ("dequant", "float32")
    reference = KernelChoice("dequant", "dequant")
    fallback = "int8"
    compressed = CompressedScheme(
        "naive-quantized",
        {"num_bits": 8, "type": "int", "symmetric": True, "group_size": G, "strategy": "group", "dynamic": False},
    )

    def accepts(self, out_features: int, in_features: int) -> bool:
        return in_features % G == 0

    def linear(self, in_features, out_features, bias, scratch):
        return Int8G64Linear(in_features, out_features, bias, scratch)

    def embedding(self, rows, dim):
        return Int8G64Embedding(rows, dim)

    def dequantize(self, module):
        return module.dequantized(torch.float32)

    def bench(self, shape, dtype):
        layer = Int8G64Linear(shape[1], shape[0], bias=False).to(dtype)
        layer._fill(torch.randn(*shape), 0)
        return lambda x, name: (setattr(layer, "kernels", KernelChoice(name, name)), layer(x))[1]

    def stored_tensors(self, out_features, in_features, dtype):
        return {
            "weight": (torch.int8, (out_features, in_features)),
            "weight_scale": (dtype, (out_features, in_features // G)),
        }

    def stored_rows(self, rows, leaf, dtype):
        q, scale = quantize_g64(rows, dtype)
        return q if leaf == "weight" else scale


@pytest.fixture
def toy():
    with registry.registered(Int8G64()) as fmt:
        yield fmt


def _prompt(cfg):
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108]])
    g = torch.Generator().manual_seed(0)
    return ids, torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1


def test_only_registered_formats_are_options(toy):
    assert "int8g64" in registry.quantize_modes()
    assert LoadOptions(quantize="int8g64").quantize == "int8g64"
    registry.unregister("int8g64")
    with pytest.raises(OptionError, match="quantize must be one of int8, int4, got 'int8g64'"):
        LoadOptions(quantize="int8g64")
    registry.register(toy)  # the fixture takes it away again


def test_a_load_quantizes_as_it_streams_and_computes_close_to_float(toy, tiny_pg1_dir):
    loaded = load_model(tiny_pg1_dir, dtype=torch.float32, quantize="int8g64", chunk_bytes=4096)  # many chunks
    model = loaded.model
    assert loaded.quantize == "int8g64"
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["language_model.model.layers.0.mlp.up_proj"] == "Int8G64Linear"  # 64 wide: groups of 64 fit
    assert kinds["language_model.model.embed_tokens"] == "Int8G64Embedding"
    assert kinds["vision_tower.vision_model.encoder.layers.0.mlp.fc1"] == "Int8Linear"  # 32 wide: the fallback
    dense = load_model(tiny_pg1_dir, dtype=torch.float32).model
    layer = model.language_model.model.layers[0].mlp.up_proj
    want = dense.language_model.model.layers[0].mlp.up_proj.weight
    scale = layer.weight_scale.repeat_interleave(G, 1)
    assert ((toy.dequantize(layer) - want).abs() <= scale / 2 + 1e-7).all()  # each weight within half a step
    ids, pixels = _prompt(model.cfg)
    with torch.inference_mode():
        a, b = model(ids, pixels)[0, -1], dense(ids, pixels)[0, -1]
    assert (a - b).abs().max() < 0.1 * b.abs().max()
    assert len(list(generate(model, ids, pixel_values=pixels, max_new_tokens=5, eos_token_ids=[]))) == 5


def test_the_chooser_times_its_kernels(toy, tiny_pg1_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(chooser.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(chooser.ENV_KERNELS, raising=False)
    monkeypatch.setattr(chooser, "BUSY_LIMIT", 1.0)
    monkeypatch.setattr(chooser, "SPREAD_LIMIT", 1e9)
    loaded = load_model(tiny_pg1_dir, dtype=torch.bfloat16, quantize="int8g64")
    detail = next(m for m in loaded.kernels.details if m.what.startswith("int8g64"))
    assert detail.source == "measured" and set(detail.seconds) == {f"{p} {k}" for p in ("decode", "prefill")
                                                                    for k in ("dequant", "float32")}  # fmt: skip
    assert loaded.kernels.plan["int8g64"] == KernelChoice(*detail.choice.split("/"))
    assert all(m.kernels == loaded.kernels.plan["int8g64"] for m in loaded.model.modules()
               if type(m) is Int8G64Linear)  # fmt: skip
    spec = chooser.parse_spec("int8g64=float32/dequant")
    assert spec == {"int8g64": KernelChoice("float32", "dequant")}


def test_memory_estimates_read_its_size(toy, tiny_pg1_dir):
    loaded = load_model(tiny_pg1_dir, dtype=torch.bfloat16, quantize="int8g64")
    layer = loaded.model.language_model.model.layers[0].mlp.up_proj
    real = sum(p.nbytes for p in layer.parameters())
    assert toy.weight_bytes(layer.out_features, layer.in_features, torch.bfloat16) == real
    from lowmem_paligemma.pretrained.build import build_model

    meta, _ = build_model(tiny_pg1_dir, "int8g64")
    assert preflight.model_bytes(meta, torch.bfloat16) == sum(p.nbytes for p in loaded.model.parameters())


def test_streamed_under_a_budget_it_quantizes_each_pass(toy, tiny_pg1_dir):
    from dataclasses import replace

    from lowmem_paligemma.budget.residency import plan_residency
    from lowmem_paligemma.checkpoint.loader import checkpoint_plan
    from lowmem_paligemma.pretrained.build import build_model
    from lowmem_paligemma.pretrained.keys import TIED, normalize_key

    meta, _ = build_model(tiny_pg1_dir, "int8g64")
    load_plan = checkpoint_plan(meta, tiny_pg1_dir, normalize_key, TIED)
    base = plan_residency(meta, 1 << 40, torch.float32, 0, load_plan=load_plan, process_bytes=0)
    plan = replace(base, streamed=tuple(u.name for u in base.units), buffers=2,
                   buffer_bytes=max(u.buffer_bytes for u in base.units))  # fmt: skip
    assert all(u.converts for u in plan.units)  # float32 rows quantized as they are read
    resident = load_model(tiny_pg1_dir, dtype=torch.float32, quantize="int8g64").model
    streamed = load_model(tiny_pg1_dir, dtype=torch.float32, quantize="int8g64", residency=plan)
    ids, pixels = _prompt(resident.cfg)
    run = lambda m: list(generate(m, ids, pixel_values=pixels, max_new_tokens=4, eos_token_ids=[]))  # noqa: E731
    assert run(streamed.model) == run(resident)
    assert streamed.streamer.stats.layers_read > len(plan.units)
    streamed.close()


def test_convert_writes_it_and_a_load_reads_it_as_stored(toy, tmp_path):
    from lowmem_paligemma.model.config import tiny
    from lowmem_paligemma.pretrained.synth import write_checkpoint

    src = write_checkpoint(tmp_path / "src", tiny(), dtype=torch.bfloat16)
    dst = convert_checkpoint(src, tmp_path / "dst", dtype=torch.bfloat16, quantize="int8g64")
    config = json.loads((dst / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert {g["weights"]["strategy"] for g in groups.values()} == {"group", "channel"}  # int8g64 and int8 layers
    assert parse_quantization_config(config) == "int8g64"
    entries = read_checkpoint(dst)
    assert entries["language_model.model.layers.0.mlp.up_proj.weight_scale"].shape == (128, 64 // G)
    stored = load_model(dst, dtype=torch.bfloat16)
    at_load = load_model(src, dtype=torch.bfloat16, quantize="int8g64")
    assert stored.quantize == "int8g64"
    a, b = dict(stored.model.named_parameters()), dict(at_load.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(stored.model.vision_tower.vision_model.encoder.layers[0].mlp.fc1, Int8Linear)


def test_the_cli_takes_it(toy, tiny_pg1_dir, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    result = CliRunner().invoke(main, ["generate", str(tiny_pg1_dir), str(image), "caption en", "--quantize",
                                       "int8g64", "--max-new-tokens", "3", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["quantize"] == "int8g64"
    bad = CliRunner().invoke(main, ["generate", str(tiny_pg1_dir), str(image), "caption en", "--quantize", "int7"])
    assert bad.exit_code == 2 and "quantize must be one of int8, int4, int8g64, got 'int7'" in bad.output
