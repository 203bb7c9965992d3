"""One server's state: what the routes read. The engine is None while the model loads (GET /health says 503)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...model.tasks import VQVAEDecoder
from .config import ServerConfig
from .engine import Engine
from .metrics import Metrics


@dataclass
class ServerState:
    model_id: str  # what clients name in "model" and what /v1/models and /api/tags list
    config: ServerConfig
    engine: Engine | None = None  # set once the model is loaded and the engine started
    stopping: bool = False  # a signal came: nothing new is admitted
    vae: VQVAEDecoder | None = field(init=False)  # config.vae, loaded once (a bad file fails before listening)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.vae = VQVAEDecoder.from_npz(self.config.vae) if self.config.vae is not None else None
        self.metrics = Metrics(
            queue_depth=lambda: self.engine.queue_depth if self.engine is not None else 0,
            running=lambda: self.engine.running if self.engine is not None else 0,
        )

    def stop(self) -> None:
        """Admit nothing more and end the running requests (each gets a "shutting down" error); idempotent."""
        self.stopping = True
        if self.engine is not None:
            self.engine.stop()
