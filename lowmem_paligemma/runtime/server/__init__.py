"""The HTTP server (`lowmem-paligemma serve`, docs/serve.md): OpenAI and ollama clients, and a web page.

- engine.py: one model, many clients: the queue, continuous batching, the caches, the limits;
- config.py: the operator's options (`ServerConfig`); state.py: what the routes read (`ServerState`);
- app.py: the routes (`create_app`, `app_for_session`); guard.py: key, body size and counting before any route;
- openai_api.py, ollama_api.py: each API flavour's bodies; jobs.py: a request through the engine;
- media.py: images as sent (data: URIs, base64, --media-dir files); outputs.py: the `paligemma` field;
- metrics.py: Prometheus; http_errors.py: every error in its flavour's shape; serve.py: uvicorn, loading, signals;
- static/index.html: the page.
Importing this package is cheap; FastAPI, uvicorn and prometheus_client (the `serve` extra) come with app.py.
"""
