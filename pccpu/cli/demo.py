"""``pccpu demo``: the main job in one command, on the default model, with measured numbers."""

from __future__ import annotations

from importlib import resources
from typing import Any

import click

from pccpu.cli.options import cache_options, open_prompt_cache


@click.command()
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=48, show_default=True)
@cache_options
def demo(max_tokens: int, **opts: Any) -> None:
    """Encode the demo schema once, then answer its prompt from the cache and by full prefill, and compare."""
    from pccpu.service.runtime import resolve_model_path

    schemas = resources.files("pccpu.schemas")
    schema_text = (schemas / "demo.xml").read_text(encoding="utf-8")
    prompt_text = (schemas / "demo_prompt.xml").read_text(encoding="utf-8")
    click.echo(f"model: {resolve_model_path(opts['model'])}")
    with open_prompt_cache(**opts) as pc:
        before = pc.encode_stats.tokens
        layout = pc.add_schema(schema_text)
        encoded = pc.encode_stats.tokens - before
        if encoded:
            click.echo(f"encoded schema {layout.name!r}: {encoded} tokens at {pc.encode_stats.tokens_per_second:.0f} "
                       f"tokens/s, stored in RAM and at {pc.store.stats()['disk']['path']}")
        else:
            click.echo(f"schema {layout.name!r}: every module was already in the store, nothing encoded")
        click.echo("prompt: " + " ".join(prompt_text.split()))
        options = dict(max_tokens=max_tokens)
        # measure the module cache: the same prompt asked again would otherwise reuse all but one of its cells
        pc.reuse_previous = False
        pc.ask(prompt_text, **options)  # warm-up: first-use costs (page faults, graph setup) are not the cache's
        cached = pc.ask(prompt_text, **options)
        baseline = pc.ask(prompt_text, cache=False, **options)
    click.echo("")
    click.echo(f"with the cache    ttft {cached.ttft_ms:8.1f} ms  ({cached.cached_tokens} tokens from stored modules, "
               f"{cached.uncached_tokens} decoded)")
    click.echo(f"full prefill      ttft {baseline.ttft_ms:8.1f} ms  ({baseline.uncached_tokens} tokens decoded)")
    click.echo(f"speedup           {baseline.ttft_ms / cached.ttft_ms:8.1f}x")
    click.echo("")
    click.echo(f"answer (cache):        {cached.text.strip()!r}")
    click.echo(f"answer (full prefill): {baseline.text.strip()!r}")
    same = "the same" if cached.text == baseline.text else "different"
    click.echo(f"the two answers are {same} ({pc.mode} mode)")
