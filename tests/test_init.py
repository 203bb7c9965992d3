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


def test_errors_share_one_base_and_every_one_is_exported():
    from lowmem_paligemma import errors as module

    defined = {n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Exception)
               and v.__module__ == module.__name__}  # fmt: skip
    exported = {n for n in lowmem_paligemma.__all__ if n.endswith("Error")}
    assert defined == exported, defined ^ exported  # a new error class is part of the API, or it is not an error
    assert len(defined) >= 10 and all(issubclass(getattr(module, n), lowmem_paligemma.LowmemError) for n in defined)


def test_import_does_not_pull_in_transformers():
    code = "import sys, lowmem_paligemma; print('transformers' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
