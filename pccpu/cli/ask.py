"""``pccpu encode`` and ``pccpu ask``: encode schemas, answer prompts (streamed, or one JSON object)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from pccpu.cli.options import cache_options, open_prompt_cache
from pccpu.errors import ConfigError, PmlError


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
            _check_file(path)
            before = pc.encode_stats.tokens
            layout = pc.add_schema(path, progress=_progress)
            tokens = pc.encode_stats.tokens - before
            speed = f" at {pc.encode_stats.tokens_per_second:.0f} tokens/s" if tokens else ""
            click.echo(f"{path}: schema {layout.name}, {len(layout.modules)} modules, encoded {tokens} tokens{speed}")
        stats = pc.store.stats()
        click.echo(f"store: {stats['ram']['entries']} modules in RAM, {stats['disk']['entries']} on disk "
                   f"({stats['disk']['path']})")


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
    text = sys.stdin.read() if str(prompt) == "-" else _read(prompt)
    schema_files = list(schemas) or _guess_schemas(prompt, text)
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repeat_penalty=repeat_penalty, seed=seed, stop=stop)
    with open_prompt_cache(**opts) as pc:
        for path in schema_files:
            _check_file(path)
            pc.add_schema(path, progress=None if as_json else _progress)
        if as_json:
            result = pc.ask(text, cache=not no_cache, **sampling)
            click.echo(json.dumps(result.to_dict(), indent=2))
            return
        stream = pc.stream(text, cache=not no_cache, **sampling)
        for piece in stream:
            click.echo(piece, nl=False)
        click.echo()
        result = stream.result
        if result is not None:
            click.echo(f"[ttft {result.ttft_ms:.1f} ms; {result.cached_tokens} cached + {result.uncached_tokens} "
                       f"uncached prompt tokens; {result.generated_tokens} generated; {result.finish_reason}]",
                       err=True)


def _read(path: Path) -> str:
    _check_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PmlError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", source=path) from exc


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")


def _guess_schemas(prompt: Path, text: str) -> list[Path]:
    """The prompt's schema name -> NAME.xml next to the prompt file (or in the current folder)."""
    from pccpu.pml import parse_prompt

    name = parse_prompt(text, source=str(prompt)).schema
    for folder in (prompt.parent, Path.cwd(), Path.cwd() / "schemas"):
        candidate = folder / f"{name}.xml"
        if candidate.is_file():
            return [candidate]
    raise ConfigError(f"the prompt names schema {name!r}: pass its file with --schema FILE")
