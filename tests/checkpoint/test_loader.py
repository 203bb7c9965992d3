"""The generic stream: equality with a plain load, any module and key map, zero-copy, pre-flight, phases."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowmem_paligemma.checkpoint.loader as loader
from lowmem_paligemma import CheckpointError, InsufficientMemoryError, load_model
from lowmem_paligemma.checkpoint import preflight
from lowmem_paligemma.checkpoint.loader import stream_checkpoint
from lowmem_paligemma.checkpoint.safetensors_io import read_checkpoint
from lowmem_paligemma.model.config import load_config
from lowmem_paligemma.model.paligemma import PaliGemmaForConditionalGeneration
from lowmem_paligemma.pretrained.load import normalize_key
from lowmem_paligemma.pretrained.synth import tiny_checkpoint


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _plain_state_dict(model_dir):
    state = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state |= {normalize_key(k): v for k, v in load_file(path).items()}
    return state


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_bytes", [512, 64 << 20])
def test_streamed_equals_plain_load_state_dict(tiny_pg2_dir, dtype, chunk_bytes):
    streamed = load_model(tiny_pg2_dir, dtype=dtype, chunk_bytes=chunk_bytes).model
    plain = PaliGemmaForConditionalGeneration(load_config(tiny_pg2_dir))
    plain.load_state_dict(_plain_state_dict(tiny_pg2_dir), strict=True)
    plain.to(dtype)
    a, b = _params(streamed), _params(plain)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == dtype for k in a)


class _Toy(nn.Module):
    """Not PaliGemma: a shared weight, a buffer that to_empty leaves as garbage, its own key names."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3, bias=False)
        self.b.weight = self.a.weight  # tied
        self.register_buffer("steps", torch.arange(5), persistent=False)


def test_any_module_with_its_own_key_map_tie_and_repair(tmp_path):
    src = {"enc.a.weight": torch.randn(3, 4), "enc.a.bias": torch.randn(3), "head.weight": torch.zeros(3, 4)}
    save_file(src, tmp_path / "model.safetensors")
    with torch.device("meta"):
        toy = _Toy()

    def tie(m):
        m.b.weight = m.a.weight

    def repair(m):
        m.steps.copy_(torch.arange(5))

    key_map = {"enc.a.weight": "a.weight", "enc.a.bias": "a.bias", "head.weight": "b.weight"}.get
    out = stream_checkpoint(toy, tmp_path, torch.float32, key_map=key_map, tied={"b.weight": "a.weight"}, tie=tie,
                            repair=repair)  # fmt: skip
    assert torch.equal(out.a.weight, src["enc.a.weight"]) and out.b.weight is out.a.weight
    assert torch.equal(out.steps, torch.arange(5)) and not out.training
    with torch.device("meta"):
        with pytest.raises(CheckpointError, match=r"unexpected key\(s\): head\.weight"):
            stream_checkpoint(_Toy(), tmp_path, torch.float32, key_map=key_map)


def test_tied_head_is_the_embedding_and_no_buffers_to_repair(tiny_pg2_dir):
    model = load_model(tiny_pg2_dir, dtype=torch.float32).model
    emb = model.language_model.model.embed_tokens.weight
    vocab_sized = [n for n, p in model.named_parameters() if p.shape == emb.shape]
    assert vocab_sized == ["language_model.model.embed_tokens.weight"]  # one tensor, no lm_head copy
    h = torch.randn(1, 3, emb.shape[1])
    cap = model.cfg.text.final_logit_softcap
    torch.testing.assert_close(model.language_model.logits(h), torch.tanh(h @ emb.T / cap) * cap)
    # Positions and rope tables are computed on the fly, so to_empty leaves nothing stale behind.
    assert list(model.buffers()) == []


def test_headers_are_read_without_tensor_data(tiny_pg2_dir):
    entries = read_checkpoint(tiny_pg2_dir)
    assert len(entries) == len(list(load_model(tiny_pg2_dir).model.parameters()))
    assert all(e.nbytes == e.numel * e.dtype.itemsize for e in entries.values())


def test_zero_copy_maps_the_file(tmp_path):
    src = tiny_checkpoint(tmp_path / "bf16", gemma2=True, dtype=torch.bfloat16)
    copied = load_model(src, dtype=torch.bfloat16).model
    mapped = load_model(src, dtype=torch.bfloat16, zero_copy=True).model
    a, b = _params(copied), _params(mapped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(copied(ids), mapped(ids), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="zero-copy needs a checkpoint stored in float16"):
        load_model(src, dtype=torch.float16, zero_copy=True)


def test_preflight_refuses_what_does_not_fit(tiny_pg2_dir, monkeypatch):
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 1000)
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* GB .* but 1.0 KB is available.*--force"):
        load_model(tiny_pg2_dir)
    forced = load_model(tiny_pg2_dir, dtype=torch.float32, preflight=False).model  # --force: it loads, and right
    monkeypatch.undo()
    want = load_model(tiny_pg2_dir, dtype=torch.float32).model
    assert all(torch.equal(a, b) for a, b in zip(forced.parameters(), want.parameters(), strict=True))


def test_phases_are_reported_in_order(tiny_pg2_dir):
    seen = []
    load_model(tiny_pg2_dir, on_phase=seen.append)
    shards = len(list(tiny_pg2_dir.glob("*.safetensors")))
    assert seen == ["build", "materialize"] + [f"shard {i}/{shards}" for i in range(1, shards + 1)] + ["done"]


def test_excluded_parameters_stay_on_meta_unread(tiny_pg2_dir):
    full = _params(load_model(tiny_pg2_dir, dtype=torch.bfloat16).model)
    layer = "language_model.model.layers.1."
    exclude = {k for k in full if k.startswith(layer)}
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(load_config(tiny_pg2_dir))
    assert preflight.model_bytes(model, torch.bfloat16, exclude) == preflight.model_bytes(model, torch.bfloat16) - sum(
        full[k].nbytes for k in exclude
    )
    stream_checkpoint(model, tiny_pg2_dir, torch.bfloat16, key_map=normalize_key, exclude=exclude)
    for name, p in model.named_parameters():
        assert p.is_meta == (name in exclude) and p.dtype == torch.bfloat16
        assert p.is_meta or torch.equal(p, full[name])


def test_restricted_plan_holds_the_parameters_named(tiny_pg2_dir):
    from lowmem_paligemma.pretrained.build import build_model

    model = build_model(tiny_pg2_dir, "int8")[0]
    plan = loader.checkpoint_plan(model, tiny_pg2_dir, normalize_key)
    names = {n for n, _ in model.get_submodule("language_model.model.layers.0").named_parameters()}
    names = {f"language_model.model.layers.0.{n}" for n in names}
    part = plan.restrict(names)
    covered = set(part.copies) | {p for n in part.fills for p in part.filled(n)}
    assert covered == names and part.fills  # the int8 weights are filled (quantized) from the float32 ones


def test_drop_cache_leaves_nothing_of_the_checkpoint_cached(tmp_path):
    from lowmem_paligemma.checkpoint.pagecache import drop_file, resident_total

    src = tiny_checkpoint(tmp_path / "c", dtype=torch.bfloat16)
    shards = list(src.glob("*.safetensors"))
    for path in shards:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())  # written pages are dirty until flushed, and only clean pages can be dropped
    load_model(src, dtype=torch.float16)
    assert resident_total(shards) > 0
    for path in shards:
        drop_file(path)
    assert resident_total(shards) == 0
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(load_config(src))
    stream_checkpoint(model, src, torch.float16, key_map=normalize_key, drop_cache=True)
    assert resident_total(shards) == 0


def test_converted_chunks_are_computed_from_the_page_cache_in_place(tiny_pg1_dir, monkeypatch):
    """Chunks converted while loading (stored float32 cast to float16; quantized to int8) are read in place where
    the page cache holds them, with the bits of the path through the staging buffer."""
    from contextlib import contextmanager, nullcontext

    real, seen = loader.cached_view, []

    @contextmanager
    def spy(fd, offset, nbytes):
        with real(fd, offset, nbytes) as view:
            seen.append(view is not None)
            yield view

    for path in tiny_pg1_dir.glob("*.safetensors"):
        path.read_bytes()  # cached now
    monkeypatch.setattr(loader, "cached_view", spy)
    in_place = {q: _params(load_model(tiny_pg1_dir, dtype=torch.float16, quantize=q).model) for q in (None, "int8")}
    assert len(seen) > 10 and all(seen)
    monkeypatch.setattr(loader, "cached_view", lambda fd, offset, nbytes: nullcontext(None))
    for q, params in in_place.items():
        staged = _params(load_model(tiny_pg1_dir, dtype=torch.float16, quantize=q).model)
        assert params.keys() == staged.keys() and all(torch.equal(params[k], staged[k]) for k in params)


def test_finish_runs_once_per_parameter_after_its_last_byte(tmp_path):
    src = {"a.weight": torch.randn(64, 32), "a.bias": torch.randn(64), "b.weight": torch.randn(3, 32)}
    save_file(src, tmp_path / "model.safetensors")
    with torch.device("meta"):
        toy = nn.Sequential()
        toy.add_module("a", nn.Linear(32, 64))
        toy.add_module("b", nn.Linear(32, 3, bias=False))
    seen = {}

    def finish(name):  # on the finisher thread: the whole parameter is already there
        seen[name] = toy.get_parameter(name).detach().clone()

    stream_checkpoint(toy, tmp_path, torch.float32, chunk_bytes=256, finish=finish)  # many chunks per weight
    assert sorted(seen) == sorted(src) and all(torch.equal(seen[k], src[k]) for k in src)


def test_a_load_imports_no_symbolic_shapes(tiny_pg1_dir):
    """Allocating the meta model's tensors (`materialize`) must not run torch's Python meta functions: their first
    use imports sympy, ~0.5 s of a 2 s load from the page cache (the load of a fresh process, e.g. the CLI's)."""
    code = (
        "import sys, torch; from lowmem_paligemma import load_model; "
        f"load_model({str(tiny_pg1_dir)!r}, dtype=torch.bfloat16, kernels='dense=native/linear'); "
        "print('sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
