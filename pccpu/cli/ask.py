"""``pccpu encode`` and ``pccpu ask``: encode schemas, answer prompts (streamed, or one JSON object)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from pccpu.cli.files import check_input_file, read_input_file
from pccpu.cli.options import cache_options, open_prompt_cache
from pccpu.errors import ConfigError
from pccpu.service.options import GenerationOptions


def _progress(done: int, total: int) -> None:
    if total:
        click.echo(f"\rencoding {done}/{total} tokens", nl=False, err=True)
        if done >= total:
            click.echo("", err=True)


@click.command()
@click.argument("schemas", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@cache_options
def encode(schemas: tuple[Path, ...], **opts: Any) -> None:
    """Encode every module of SCHEMAS into the store (modules already stored are skipped)."""
    with open_prompt_cache(**opts) as pc:
        for path in schemas:
            check_input_file(path)
            before = pc.stats().encode.tokens
            layout = pc.add_schema(path, progress=_progress)
            encode = pc.stats().encode
            tokens = encode.tokens - before
            speed = f" at {encode.tokens_per_second:.0f} tokens/s" if tokens else ""
            click.echo(f"{path}: schema {layout.name}, {len(layout.modules)} modules, encoded {tokens} tokens{speed}")
        store = pc.stats().store
        click.echo(f"store: {store.ram_entries} modules in RAM, {store.disk_entries} on disk ({store.disk_path})")


@click.command()
@click.argument("prompt", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True))
@click.option("--schema", "-s", "schemas", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Schema file(s) the prompt may name; default: SCHEMA.xml next to the prompt.")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 16), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, help="0: off.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0)
@click.option("--min-p", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0)
@click.option("--repeat-penalty", type=click.FloatRange(0.0, min_open=True), default=1.0)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--no-cache", is_flag=True, help="Answer by full prefill of the same tokens (the baseline).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result.")
@cache_options
def ask(prompt: Path, schemas: tuple[Path, ...], max_tokens: int, temperature: float, top_k: int, top_p: float,
        min_p: float, repeat_penalty: float, seed: int | None, stop: tuple[str, ...], no_cache: bool,
        as_json: bool, **opts: Any) -> None:
    """Answer the PML PROMPT file ('-' reads standard input)."""
    text = sys.stdin.read() if str(prompt) == "-" else read_input_file(prompt)
    schema_files = list(schemas) or _guess_schemas(prompt, text)
    options = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop)
    with open_prompt_cache(**opts) as pc:
        for path in schema_files:
            check_input_file(path)
            pc.add_schema(path, progress=None if as_json else _progress)
        answer = pc.ask(text, cache=not no_cache, options=options)
        if as_json:
            click.echo(json.dumps(answer.result().to_dict(), indent=2))
            return
        for piece in answer:
            click.echo(piece, nl=False)
        click.echo()
        result = answer.result()
        click.echo(f"[ttft {result.ttft_ms:.1f} ms; {result.cached_tokens} cached + {result.uncached_tokens} "
                   f"uncached prompt tokens; {result.generated_tokens} generated; {result.finish_reason}]", err=True)


def _guess_schemas(prompt: Path, text: str) -> list[Path]:
    """The prompt's schema name -> NAME.xml next to the prompt file (or in the current folder)."""
    from pccpu.pml import parse_prompt

    name = parse_prompt(text, source=str(prompt)).schema
    for folder in (prompt.parent, Path.cwd(), Path.cwd() / "schemas"):
        candidate = folder / f"{name}.xml"
        if candidate.is_file():
            return [candidate]
    raise ConfigError(f"the prompt names schema {name!r}: pass its file with --schema FILE")
