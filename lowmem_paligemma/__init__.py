"""lowmem_paligemma: run PaliGemma / PaliGemma 2 in little memory, and a streaming loader to import.

    import torch
    from lowmem_paligemma import Processor, TextStream, generate, load_hf_model

    model, tokenizer = load_hf_model("paligemma-3b-pt-224", dtype=torch.bfloat16)

Importing the package is cheap: transformers (for the tokenizer) is imported only when one is loaded.
docs/architecture.md maps the packages: model/ (what PaliGemma is), checkpoint/ (files to parameters),
formats/ (weight formats and their kernels), budget/ (what fits), pretrained/ (PaliGemma's checkpoints),
runtime/ (what front ends call), profiling/, cli/.
"""

from .checkpoint.loader import stream_checkpoint
from .errors import (
    CheckpointError,
    ClusterError,
    ConfigError,
    ContextLengthError,
    ImageError,
    InsufficientMemoryError,
    LowmemError,
    OptionError,
    OutputError,
    PromptError,
    TokenizerError,
    VAEWeightsError,
)
from .model.config import PRESETS, PaliGemmaConfig
from .model.generate import encode_image, generate, generate_batch
from .model.paligemma import PaliGemmaForConditionalGeneration
from .model.processor import Processor
from .model.sampling import SamplingOptions
from .model.text_stream import TextStream
from .pretrained.load import LoadedModel, load_hf_model, load_model
from .pretrained.options import LoadOptions
from .pretrained.transformers_model import load_transformers_model
from .profiling.profiler import MemoryProfiler
from .runtime.session import Session, load_session, run_prompt, run_prompts

__all__ = [
    # loading
    "load_model",
    "LoadedModel",
    "LoadOptions",
    "load_hf_model",
    "stream_checkpoint",
    "load_transformers_model",
    # running
    "Processor",
    "generate",
    "generate_batch",
    "encode_image",
    "TextStream",
    "SamplingOptions",
    "Session",
    "load_session",
    "run_prompt",
    "run_prompts",
    # model and config
    "PaliGemmaForConditionalGeneration",
    "PaliGemmaConfig",
    "PRESETS",
    # memory
    "MemoryProfiler",
    # errors
    "LowmemError",
    "CheckpointError",
    "ConfigError",
    "ContextLengthError",
    "TokenizerError",
    "ImageError",
    "PromptError",
    "VAEWeightsError",
    "OutputError",
    "OptionError",
    "InsufficientMemoryError",
    "ClusterError",
]
