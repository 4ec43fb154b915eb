"""``pccpu serve``: the OpenAI-compatible server (see ``pccpu.server``)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import click

from pccpu.cli.options import cache_options, open_prompt_cache

logger = logging.getLogger(__name__)

PARALLEL_DEFAULT = 4  # measured: bench/concurrency.py, docs/results/server-concurrency.md


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but a loopback address exposes the model to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="PCCPU_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request. Env: PCCPU_API_KEY.")
@click.option("--model-id", default=None, help="The model name clients send (default: the .gguf file's stem).")
@click.option("--max-queue", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Requests waiting beyond this get 429 with Retry-After.")
@click.option("--max-new-tokens", type=click.IntRange(1, 1 << 16), default=512, show_default=True,
              help="Answer length when a request gives no max_tokens.")
@click.option("--pml-root", type=click.Path(file_okay=False, exists=True), default=None,
              help="The one folder that schemas sent over HTTP may read src= files from (default: none).")
@click.option("--reuse", type=click.Choice(["exact", "compose"]), default="exact", show_default=True,
              help="How chats reuse stored messages: exact (only after the same conversation prefix: the answer of "
                   "a full prefill) or compose (documents and messages reused wherever they appear, repaired at "
                   "their start; close to full prefill, not equal). A request can choose with "
                   "{\"pccpu\": {\"reuse\": ...}}.")
@click.option("--idle-timeout", type=click.IntRange(1, 86400), default=5, show_default=True, metavar="SECONDS",
              help="Close a kept-alive HTTP connection after this many seconds without a request (uvicorn's "
                   "timeout_keep_alive). A request in progress is not cut: a client that disconnects stops its "
                   "generation, and one that stops reading holds the model no longer than its max_tokens.")
@click.option("--parallel", type=click.IntRange(1, 64), default=PARALLEL_DEFAULT, show_default=True,
              help="Chat answers generated together (continuous batching: one decode step for all; on a CPU about "
                   "1.7x the tokens per second with 2, 2.5x with 4). Answers that overlap in time are then not "
                   "bit-identical to the same answers alone; 1 keeps every answer exact under any load.")
@cache_options
def serve(host: str, port: int, api_key: str | None, model_id: str | None, max_queue: int, max_new_tokens: int,
          pml_root: str | None, reuse: str, idle_timeout: int, parallel: int, **opts: Any) -> None:
    """Serve /v1/chat/completions, /v1/models, /health and /metrics over HTTP."""
    import uvicorn

    from pccpu.server import ServerSettings, create_app
    from pccpu.service import PromptCache
    from pccpu.service.prompt_cache import N_SEQ_MAX_DEFAULT

    if not _is_loopback(host):
        click.echo(f"warning: listening on {host}: anyone who can reach it can use the model"
                   f"{'' if api_key else ' (no --api-key set)'}", err=True)
    n_seq_max = max(N_SEQ_MAX_DEFAULT, PromptCache.n_seq_max_for(parallel))  # a lane for each of --parallel
    cache = open_prompt_cache(**opts, chat_reuse=reuse, n_seq_max=n_seq_max)
    name = model_id or cache.model_path.stem
    settings = ServerSettings(model_id=name, api_key=api_key, max_queue=max_queue, max_new_tokens=max_new_tokens,
                              pml_root=pml_root, parallel=parallel)
    app = create_app(cache, settings)
    click.echo(f"serving {name} on http://{host}:{port}/v1", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=idle_timeout)
    finally:
        cache.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
