"""`lowmem-paligemma serve`: the HTTP server (docs/serve.md), a few lines over runtime/server/serve.py.

The server's packages (the `serve` extra) are imported when the command runs, so every other command works
without them.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import OptionError
from ..pretrained.options import LoadOptions
from ..runtime.server.config import ServerConfig
from ..runtime.server.engine import Engine
from ..runtime.session import Session
from ..units import format_size
from .options import EXISTING_FILE, MODEL_DIR, ByteSize, flag, library_default, load_options, validated
from .report import load_line, plan_lines, show_progress, user_errors

API_KEY_ENV = "LOWMEM_PALIGEMMA_API_KEY"
_C = ServerConfig()


@click.command("serve")
@click.argument("model_dir", type=MODEL_DIR)
@load_options
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 opens the server to the network (set --api-key).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@click.option(
    "--api-key",
    envvar=API_KEY_ENV,
    show_envvar=True,
    help="Clients must send Authorization: Bearer KEY (/health and the page excepted). The environment "
    "variable keeps the key out of the process list.",
)
@click.option(
    "--parallel",
    type=int,
    default=library_default(Engine.__init__, "parallel"),
    show_default=True,
    help="Requests decoded together.",
)
@click.option(
    "--max-queue",
    type=int,
    default=library_default(Engine.__init__, "max_queue"),
    show_default=True,
    help="Requests waiting beyond those; more get 503 with Retry-After.",
)
@click.option(
    "--media-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Clients may name image files under this directory (a path or file:// URL); none elsewhere.",
)
@click.option("--vae", type=EXISTING_FILE, help="vae-oid.npz: segmentation masks in the responses.")
@click.option(
    "--max-body",
    type=ByteSize(),
    default=_C.max_body,
    show_default=format_size(_C.max_body),
    help="Largest request body, images included (413 above).",
)
def serve_command(
    model_dir: Path, load: LoadOptions, host: str, port: int, api_key: str | None, parallel: int, max_queue: int,
    media_dir: Path | None, vae: Path | None, max_body: int,
) -> None:  # fmt: skip
    """Serve MODEL_DIR over HTTP to OpenAI and ollama clients, with a web page at /.

    \b
    Listens at once (GET /health says 503 while the model loads). OpenAI: POST /v1/chat/completions;
    ollama: POST /api/generate, /api/chat; Prometheus: GET /metrics. Ctrl-C or SIGTERM stops it.
    """
    for name, value, least in (("parallel", parallel, 1), ("max_queue", max_queue, 0)):
        if value < least:
            raise click.BadParameter(f"must be at least {least}, got {value}", param_hint=flag(name))
    config = validated(ServerConfig, api_key=api_key, media_dir=media_dir, vae=vae, max_body=max_body)
    try:
        from ..runtime.server.serve import serve
    except ImportError as e:
        raise click.ClickException(
            f"the server needs its packages ({e.name} is missing): pip install 'lowmem_paligemma[serve]'"
        ) from None

    def listening(url: str, model_id: str) -> None:
        click.echo(f"serving {model_id} at {url} (web page at {url}/); loading the model...", err=True)

    def ready(session: Session) -> None:
        click.echo("\n".join([load_line(session), *plan_lines(session), "ready"]), err=True)

    with user_errors():
        try:
            serve(model_dir, load, config, host=host, port=port, parallel=parallel, max_queue=max_queue,
                  progress=show_progress(), on_listening=listening, on_ready=ready)  # fmt: skip
        except OptionError as e:
            raise click.BadParameter(str(e), param_hint=flag(e.option) if e.option else None) from None
