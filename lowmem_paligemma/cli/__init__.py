"""`lowmem-paligemma`: generate, chat, profile, batch, synth and convert from the command line.

- options.py: option groups (each group arrives as one validated LoadOptions / SamplingOptions);
- report.py: what goes to stderr (load / speed / memory lines, progress bars, the one-line `Error:`);
- run.py: the commands that run the model; files.py: the commands that write checkpoints; info.py: the machine
  and what a load would choose on it.
Every failure a user can cause ends as one `Error: ...` line and a non-zero exit code, never a traceback;
Ctrl-C ends as one "interrupted" line and exit code 130.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import click

from .files import convert_command, synth_command
from .info import info_command
from .run import batch_command, chat_command, generate_command, profile_command
from .serve import serve_command


def _package_version() -> str:
    try:
        return version("lowmem_paligemma")
    except PackageNotFoundError:
        return "unknown (not installed)"


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C


class _Group(click.Group):
    """Ctrl-C ends any command with one short line and exit code 130 (click would print "Aborted!", exit 1)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise click.exceptions.Exit(INTERRUPTED_EXIT_CODE) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_package_version(), prog_name="lowmem-paligemma")
def main() -> None:
    """Low-RAM PaliGemma / PaliGemma 2: stream a Hub checkpoint in, then caption, answer, detect and segment.

    MODEL_DIR is a Hub-layout directory (config.json, *.safetensors, tokenizer files).
    """


_COMMANDS = (
    generate_command,
    chat_command,
    profile_command,
    batch_command,
    serve_command,
    synth_command,
    convert_command,
    info_command,
)
for _command in _COMMANDS:
    main.add_command(_command)

__all__ = ["main"]
