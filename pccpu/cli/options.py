"""Option bundles shared by the commands that open a model (``ask``, ``encode``, ``demo``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pccpu.errors import ConfigError
from pccpu.service.passes import CONTEXT_MODES
from pccpu.service.repair import DEFAULT_REPAIR_TOKENS
from pccpu.service.runtime import ROLE_MODES

if TYPE_CHECKING:
    from pccpu.service import PromptCache


def cache_options(func: Callable[..., Any] | None = None, *,
                  default_model: str | None = None) -> Callable[..., Any]:
    """--model, --n-ctx, --threads, --mode, --roles, --namespace, --no-persist, --store-url, --kv-type, and GPU offload:
    --gpu-layers, --kv-on-cpu, --resident-mb. ``@cache_options`` or ``@cache_options(default_model=NAME)``."""
    if func is None:
        return functools.partial(cache_options, default_model=default_model)
    model_help = "the registry's default" if default_model is None else default_model
    decorators = [
        click.option("--model", "-m", envvar="PCCPU_MODEL", default=default_model,
                     help=f"Registry name (see `pccpu models list`) or a .gguf path (default: {model_help}). "
                          "Env: PCCPU_MODEL."),
        click.option("--n-ctx", type=click.IntRange(64, 1 << 20), default=4096, show_default=True,
                     help="Context size in tokens."),
        click.option("--threads", type=click.IntRange(1, 1024), default=None,
                     help="CPU threads (default: the physical cores available)."),
        click.option("--mode", type=click.Choice(CONTEXT_MODES), default="sequential", show_default=True,
                     help="What a module attends to when encoded (see README)."),
        click.option("--roles", type=click.Choice(ROLE_MODES), default="auto", show_default=True,
                     help="How <system>/<user>/<assistant> render: the model's chat template or a fallback."),
        click.option("--chat-template", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     metavar="FILE",
                     help="A Jinja chat template to use instead of the model's own (a base model's GGUF has none: "
                          "gemma-3-270m with the Gemma 3 instruction template, for example)."),
        click.option("--kv-type", type=click.Choice(["f16", "q8_0"]), default="f16", show_default=True,
                     help="KV cache element type (K and V); q8_0 halves module memory and turns flash attention on."),
        click.option("--namespace", default="default", show_default=True, help="Store namespace (tenant)."),
        click.option("--no-persist", is_flag=True, help="Keep module states in RAM only (no disk tier)."),
        click.option("--store-url", envvar="PCCPU_STORE_URL", default=None, metavar="redis://HOST:PORT/DB",
                     help="A Redis (or Valkey) server shared by several machines: a remote tier behind RAM and disk, "
                          "each module encoded once per fleet (see docs/remote-store.md). Env: PCCPU_STORE_URL."),
        click.option("--gpu-layers", default="none", show_default=True, envvar="PCCPU_GPU_LAYERS",
                     help="Layers to offload to the GPU: all, none or a number (needs the CUDA build, see README). "
                          "Env: PCCPU_GPU_LAYERS."),
        click.option("--kv-on-cpu", is_flag=True,
                     help="With GPU layers, keep the KV cache (and module states) in host memory."),
        click.option("--resident-mb", type=click.IntRange(0, 1 << 20), default=0, show_default=True,
                     help="Keep used module runs in the KV cache between prompts, up to this many MiB (GPU memory "
                          "with GPU layers): no restore copy for them."),
        click.option("--repair-tokens", type=click.IntRange(0, 1 << 16), default=DEFAULT_REPAIR_TOKENS,
                     show_default=True,
                     help="Boundary repair: first tokens of each module placed after other text than it was encoded "
                          "after that are decoded in place instead of restored (0: off)."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def open_prompt_cache(model: str | None, n_ctx: int, threads: int | None, mode: str, roles: str, kv_type: str,
                      namespace: str, no_persist: bool, gpu_layers: str, kv_on_cpu: bool, resident_mb: int,
                      repair_tokens: int = DEFAULT_REPAIR_TOKENS, reuse_previous: bool = True,
                      chat_reuse: str = "exact", store_url: str | None = None,
                      chat_template: Path | None = None, n_seq_max: int | None = None) -> PromptCache:
    from pccpu.engine import parse_gpu_layers
    from pccpu.service import PromptCache
    from pccpu.service.prompt_cache import N_SEQ_MAX_DEFAULT

    n_gpu_layers = parse_gpu_layers(gpu_layers)
    # flash attention: needed by a q8_0 V cache; on a GPU, faster (None lets PromptCache decide)
    flash_attn = True if kv_type != "f16" else None
    template = read_chat_template(chat_template) if chat_template is not None else None
    return PromptCache(model, n_ctx=n_ctx, n_threads=threads, mode=mode, roles=roles, chat_template=template,
                       type_k=kv_type, type_v=kv_type, n_seq_max=N_SEQ_MAX_DEFAULT if n_seq_max is None else n_seq_max,
                       flash_attn=flash_attn, namespace=namespace, persist=not no_persist, store_url=store_url or None,
                       n_gpu_layers=n_gpu_layers, offload_kqv=not kv_on_cpu, resident_budget=resident_mb << 20,
                       repair_tokens=repair_tokens, reuse_previous=reuse_previous, chat_reuse=chat_reuse)


def read_chat_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the chat template {path}: {exc} (give a UTF-8 Jinja file)") from exc
