"""``pccpu cache ls|stats|clear|path``: what the module store holds, per tier, and where."""

from __future__ import annotations

import json
import time

import click

from pccpu.cli.schema import human_bytes
from pccpu.errors import InternalError
from pccpu.store.disk import DiskTier
from pccpu.store.module_store import ModuleStore


def _store(namespace: str) -> ModuleStore:
    return ModuleStore(namespace=namespace, ram_budget=0)


def _disk(namespace: str) -> DiskTier:
    disk = _store(namespace).disk
    if disk is None:
        raise InternalError("a persistent module store has no disk tier")
    return disk


namespace_option = click.option("--namespace", default="default", show_default=True, help="Store namespace.")


@click.group()
def cache() -> None:
    """Inspect and clear the module store (the disk tier; the RAM tier lives inside a running process)."""


@cache.command("path")
@namespace_option
def path_cmd(namespace: str) -> None:
    """Print the folder of the store's disk tier."""
    click.echo(str(_disk(namespace).directory))


@cache.command("ls")
@namespace_option
@click.option("--json", "as_json", is_flag=True)
def ls_cmd(namespace: str, as_json: bool) -> None:
    """List stored modules: schema, module, tokens, bytes, last use."""
    disk = _disk(namespace)
    rows = []
    for info in sorted(disk.infos(), key=lambda i: -i.mtime):
        header = disk.header(info) or {}
        rows.append({"schema": header.get("schema", "?"), "module": header.get("module", "?") or "(root)",
                     "tokens": header.get("n_cells", 0), "bytes": info.size, "start": info.key.start,
                     "model": header.get("model_file", "?"), "mode": header.get("mode", "?"),
                     "last_used": info.mtime, "file": info.path.name})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no stored modules in {disk.directory}")
        return
    click.echo(f"{'schema':<16} {'module':<28} {'tokens':>7} {'bytes':>10} {'mode':<10} {'model':<32} last used")
    for r in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
        size = human_bytes(r["bytes"])
        click.echo(f"{r['schema']:<16} {r['module']:<28} {r['tokens']:>7} {size:>10} {r['mode']:<10} "
                   f"{r['model']:<32} {used}")


@cache.command("stats")
@namespace_option
@click.option("--json", "as_json", is_flag=True)
def stats_cmd(namespace: str, as_json: bool) -> None:
    """Entries and bytes per tier, with budgets."""
    stats = _store(namespace).stats()
    if as_json:
        click.echo(json.dumps(stats.to_dict(), indent=2))
        return
    click.echo(f"namespace {stats.namespace}")
    click.echo(f"disk  {stats.disk_entries} modules, {human_bytes(stats.disk_bytes)} of "
               f"{human_bytes(stats.disk_budget_bytes)} budget ({stats.disk_path})")
    click.echo(f"ram   budget {human_bytes(default_ram())} per process (a quarter of the memory available now)")


def default_ram() -> int:
    from pccpu.store.module_store import default_ram_budget

    return default_ram_budget()


@cache.command("clear")
@namespace_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def clear_cmd(namespace: str, yes: bool) -> None:
    """Delete every stored module of the namespace."""
    store = _store(namespace)
    if not yes:
        click.confirm(f"delete every stored module in {store.disk.directory if store.disk else '?'}?", abort=True)
    removed = store.clear()
    click.echo(f"removed {removed} stored modules")
