"""``pccpu demo``: the main job in one command, with measured numbers and the answer checked against the manual."""

from __future__ import annotations

from importlib import resources
from typing import Any

import click

from pccpu.cli.options import cache_options, open_prompt_cache

DEMO_MODEL = "qwen2.5-coder-0.5b"  # the smallest registry model that answers the demo's question right (README)
EXPECTED = "7-3-1-9"  # the factory-reset code planted in schemas/demo.xml


@click.command()
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=48, show_default=True)
@cache_options(default_model=DEMO_MODEL)
def demo(max_tokens: int, **opts: Any) -> None:
    """Encode the demo schema once, then answer its prompt from the cache and by full prefill, and compare."""
    schemas = resources.files("pccpu.schemas")
    schema_text = (schemas / "demo.xml").read_text(encoding="utf-8")
    prompt_text = (schemas / "demo_prompt.xml").read_text(encoding="utf-8")
    # every answer is assembled from the module store: the same prompt asked again would otherwise reuse all but
    # one of its cells, and the demo measures the module cache
    with open_prompt_cache(**opts, reuse_previous=False) as pc:
        click.echo(f"model: {pc.model_path}")
        before = pc.stats().encode.tokens
        layout = pc.add_schema(schema_text)
        stats = pc.stats()
        encoded = stats.encode.tokens - before
        if encoded:
            click.echo(f"encoded schema {layout.name!r}: {encoded} tokens at {stats.encode.tokens_per_second:.0f} "
                       f"tokens/s, stored in RAM and at {stats.store.disk_path}")
        else:
            click.echo(f"schema {layout.name!r}: every module was already in the store, nothing encoded")
        click.echo("prompt: " + " ".join(prompt_text.split()))
        pc.warm_up()  # first-use costs (graph setup, page faults) are not the cache's
        cached = pc.ask(prompt_text, max_tokens=max_tokens).result()
        baseline = pc.ask(prompt_text, cache=False, max_tokens=max_tokens).result()
        mode = pc.mode
    click.echo("")
    click.echo(f"with the cache    ttft {cached.ttft_ms:8.1f} ms  ({cached.cached_tokens} tokens from stored modules, "
               f"{cached.uncached_tokens} decoded)")
    click.echo(f"full prefill      ttft {baseline.ttft_ms:8.1f} ms  ({baseline.uncached_tokens} tokens decoded)")
    click.echo(f"speedup           {baseline.ttft_ms / cached.ttft_ms:8.1f}x")
    click.echo("")
    click.echo(f"answer (cache):        {cached.text.strip()!r}")
    click.echo(f"answer (full prefill): {baseline.text.strip()!r}")
    same = "the same" if cached.text == baseline.text else "different"
    click.echo(f"the two answers are {same} ({mode} mode)")
    for label, result in (("cache", cached), ("full prefill", baseline)):
        verdict = "right" if EXPECTED in result.text else "WRONG"
        click.echo(f"the {label} answer is {verdict}: the manual's reset code is {EXPECTED}")
