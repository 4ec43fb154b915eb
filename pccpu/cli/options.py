"""Option bundles shared by the commands that open a model (``ask``, ``encode``, ``demo``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from pccpu.service.passes import CONTEXT_MODES
from pccpu.service.runtime import ROLE_MODES


def cache_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--model, --n-ctx, --threads, --mode, --roles, --namespace, --no-persist, --kv-type."""
    decorators = [
        click.option("--model", "-m", envvar="PCCPU_MODEL", default=None,
                     help="Registry name (see `pccpu models list`) or a .gguf path. Env: PCCPU_MODEL."),
        click.option("--n-ctx", type=click.IntRange(64, 1 << 20), default=4096, show_default=True,
                     help="Context size in tokens."),
        click.option("--threads", type=click.IntRange(1, 1024), default=None,
                     help="CPU threads (default: the physical cores available)."),
        click.option("--mode", type=click.Choice(CONTEXT_MODES), default="sequential", show_default=True,
                     help="What a module attends to when encoded (see README)."),
        click.option("--roles", type=click.Choice(ROLE_MODES), default="auto", show_default=True,
                     help="How <system>/<user>/<assistant> render: the model's chat template or a fallback."),
        click.option("--kv-type", type=click.Choice(["f16", "q8_0"]), default="f16", show_default=True,
                     help="KV cache element type (K and V); q8_0 halves module memory and turns flash attention on."),
        click.option("--namespace", default="default", show_default=True, help="Store namespace (tenant)."),
        click.option("--no-persist", is_flag=True, help="Keep module states in RAM only (no disk tier)."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def open_prompt_cache(model: str | None, n_ctx: int, threads: int | None, mode: str, roles: str, kv_type: str,
                      namespace: str, no_persist: bool) -> Any:
    from pccpu.service import PromptCache

    return PromptCache(model, n_ctx=n_ctx, n_threads=threads, mode=mode, roles=roles, type_k=kv_type,
                       type_v=kv_type, flash_attn=kv_type != "f16", namespace=namespace, persist=not no_persist)
