"""The failures a user can cause and fix, in one small hierarchy.

Every message is one line that names the file, field or value and the problem. The CLI turns any
`LowmemError` into one `Error: ...` line and a non-zero exit; anything else is a bug and keeps its
traceback. The ones that describe a bad input value also subclass `ValueError`, so callers that
already catch `ValueError` keep working.
"""

from __future__ import annotations


class LowmemError(Exception):
    """Base class: a failure the user can cause and fix (bad input, not enough memory)."""


class ConfigError(LowmemError, ValueError):
    """A config.json that cannot describe a PaliGemma model."""


class CheckpointError(LowmemError, ValueError):
    """A checkpoint that cannot be loaded: a missing directory, bad headers, keys or shapes."""


class TokenizerError(LowmemError, ValueError):
    """A model directory without a loadable tokenizer, or one that does not match the model config."""


class ImageError(LowmemError, ValueError):
    """A file that is missing or cannot be decoded as an image."""


class PromptError(LowmemError, ValueError):
    """A prompt the model cannot take (empty, or holding the <image> placeholder the processor adds)."""


class VAEWeightsError(LowmemError, ValueError):
    """A vae-oid.npz that is missing, unreadable or not in big_vision's key layout."""


class OutputError(LowmemError, ValueError):
    """A destination that cannot be written as asked (exists and is not empty, is the source, no space)."""


class OptionError(LowmemError, ValueError):
    """An option value, or a combination of options, the runtime cannot honour (e.g. a memory budget on a GPU).

    `option` names the field at fault (a LoadOptions / SamplingOptions field, e.g. "max_memory"), so a front end
    can point at its own spelling of it (the CLI's --max-memory, the server's JSON field)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class InsufficientMemoryError(LowmemError):
    """The load would not fit in the memory available now."""


class ContextLengthError(LowmemError, ValueError):
    """A request longer than the model's context: prompt + max_new_tokens over max_position_embeddings."""


class ClusterError(LowmemError):
    """The Ray cluster named by --ray-address cannot be joined (nothing answers there, or it refuses us)."""
