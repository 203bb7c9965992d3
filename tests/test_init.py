"""The front door: every public name imports from the package, and importing it stays cheap."""

import subprocess
import sys

import lowmem_paligemma


def test_every_exported_name_is_there():
    assert len(lowmem_paligemma.__all__) == len(set(lowmem_paligemma.__all__)) >= 20
    for name in lowmem_paligemma.__all__:
        assert getattr(lowmem_paligemma, name) is not None, name
    for name in ("load_model", "load_hf_model", "stream_checkpoint", "load_transformers_model", "Processor",
                 "generate", "encode_image", "TextStream", "PaliGemmaConfig", "PRESETS", "MemoryProfiler"):  # fmt: skip
        assert name in lowmem_paligemma.__all__, name


def test_errors_share_one_base():
    errors = [getattr(lowmem_paligemma, n) for n in lowmem_paligemma.__all__ if n.endswith("Error")]
    assert len(errors) >= 8 and all(issubclass(e, lowmem_paligemma.LowmemError) for e in errors)


def test_import_does_not_pull_in_transformers():
    code = "import sys, lowmem_paligemma; print('transformers' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
