"""The ``pccpu`` command line. Each command group lives in its own module and is registered here."""

from __future__ import annotations

import logging

import click

from pccpu import __version__
from pccpu.errors import PccpuError


class _PccpuGroup(click.Group):
    """Turns every pccpu error into a one-line message and exit code 1: the one place errors meet the user."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except PccpuError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@click.group(cls=_PccpuGroup)
@click.version_option(__version__, prog_name="pccpu")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs, llama.cpp's included.")
def main(verbose: bool) -> None:
    """pccpu: Prompt Cache for GGUF models on llama.cpp, CPU first."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _register() -> None:
    from pccpu.cli import ask as ask_cli
    from pccpu.cli import bench as bench_cli
    from pccpu.cli import cache as cache_cli
    from pccpu.cli import chat as chat_cli
    from pccpu.cli import demo as demo_cli
    from pccpu.cli import models as models_cli
    from pccpu.cli import schema as schema_cli
    from pccpu.cli import serve as serve_cli

    main.add_command(bench_cli.bench)
    main.add_command(models_cli.models)
    main.add_command(schema_cli.schema)
    main.add_command(ask_cli.encode)
    main.add_command(ask_cli.ask)
    main.add_command(cache_cli.cache)
    main.add_command(chat_cli.chat)
    main.add_command(demo_cli.demo)
    main.add_command(serve_cli.serve)


_register()
