"""``pccpu models``: fetch, list and locate the GGUF models of the registry.

``fetch`` prints the path of the .gguf file as the last line of stdout, so ``MODEL=$(pccpu models fetch | tail -1)``
works; pip's progress and pccpu's log lines go to stderr.
"""

from __future__ import annotations

import logging
import os

import click

from pccpu.models import MODEL_ENV, fetch_model, load_registry, local_status, model_path, resolve_model
from pccpu.paths import models_dir

_STATUS_TEXT = {"verified": "present", "unverified": "present (unverified)", "absent": "absent"}


def _show_fetch_progress() -> None:
    """Let the fetcher's "part i/n" lines through even without --verbose."""
    logger = logging.getLogger("pccpu.models")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


@click.group()
def models() -> None:
    """Fetch, list and locate GGUF models."""


@models.command("fetch")
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="Download and replace the model even if a verified copy is present.")
def fetch(name: str | None, force: bool) -> None:
    """Download model NAME (default: $PCCPU_MODEL, else the registry default), verify it, print its path.

    NAME is a registry name (see `pccpu models list`) or the path of a local .gguf file, which is only checked.
    """
    registry = load_registry()
    value = name or os.environ.get(MODEL_ENV, "").strip() or registry.default
    _show_fetch_progress()
    if value in registry:
        path = fetch_model(registry.get(value), registry=registry, force=force)
    else:
        if force:
            raise click.UsageError(f"--force applies to registry models only, and {value!r} is not one")
        path = resolve_model(value, registry=registry)
    click.echo(str(path))


@models.command("list")
def list_models() -> None:
    """Show the registry's models, their size and whether they are downloaded (with their path if so)."""
    registry = load_registry()
    rows = []
    for spec in registry.models.values():
        label = spec.name + (" (default)" if spec.name == registry.default else "")
        status = local_status(spec)
        rows.append((label, f"{spec.size / 1e6:,.0f} MB", _STATUS_TEXT[status], spec.description, spec, status))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for label, size, status_text, description, spec, status in rows:
        click.echo(f"{label:<{widths[0]}}  {size:>{widths[1]}}  {status_text:<{widths[2]}}  {description}")
        if status != "absent":
            click.echo(f"{'':<{widths[0]}}  {model_path(spec)}")


@models.command("path")
@click.argument("name", required=False)
def path(name: str | None) -> None:
    """Print where model NAME is (or would be) stored; without NAME, the models folder."""
    if name is None:
        click.echo(str(models_dir()))
        return
    click.echo(str(model_path(load_registry().get(name))))
