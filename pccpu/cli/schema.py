"""``pccpu schema``: check PML schemas and prompts, and show a schema's layout with the KV memory it costs.

``check`` takes schemas and prompts together (a prompt is resolved against the schema of the same command line that
it names) and prints one ``OK`` line per file, or the first error. ``show`` prints a schema's modules, unions and
parameters with their position ranges, token counts and the KV memory each module's cached state takes.

Both load the model only for its tokenizer and chat template (nothing is decoded), so the context they open is
small: ``n_ctx`` from ``--n-ctx`` and a single sequence.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pccpu.cli.files import read_input_file
from pccpu.cli.options import read_chat_template
from pccpu.engine.context import KV_TYPES
from pccpu.errors import DuplicateNameError, InternalError, PmlStructureError, UnknownSchemaError
from pccpu.pml import (
    ModuleLayout,
    Prompt,
    Schema,
    SchemaLayout,
    build_layout,
    parse_prompt,
    parse_schema,
    resolve_prompt,
)
from pccpu.pml.xmltree import parse_xml
from pccpu.service.runtime import ROLE_MODES

if TYPE_CHECKING:
    from pccpu.engine import ContextSettings
    from pccpu.service.runtime import Runtime

DEFAULT_N_CTX = 4096


@dataclass(frozen=True)
class _PmlFile:
    """One file of the command line, parsed: exactly one of ``schema`` and ``prompt`` is set."""

    path: str
    schema: Schema | None = None
    prompt: Prompt | None = None


def _load(path: str) -> _PmlFile:
    """Read and parse one file as a schema or a prompt, by its root element."""
    text = read_input_file(path)
    root = parse_xml(text, source=path)  # the parser limits nesting depth itself
    if root.tag == "prompt":
        return _PmlFile(path, prompt=parse_prompt(text, source=path))
    if root.tag == "schema":
        # parse from the path, so that src= files are found next to the schema
        return _PmlFile(path, schema=parse_schema(Path(path), source=path))
    raise PmlStructureError(f"{root.where()}: the root element must be <schema> or <prompt>, not <{root.tag}>",
                            source=path)


def _module_count(schema: Schema) -> int:
    return sum(1 for _ in schema.walk())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def human_bytes(n: float) -> str:
    """Bytes in binary units with one decimal: ``1536`` -> ``1.5 KiB``."""
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB"):
        value /= 1024
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


def _settings(n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> ContextSettings:
    """A small context: nothing is decoded, the model is needed for its tokenizer, template and shape only."""
    from pccpu.engine import ContextSettings

    batch = min(512, n_ctx)
    # a quantized V cache exists only with flash attention in llama.cpp
    return ContextSettings(n_ctx=n_ctx, n_batch=batch, n_ubatch=batch, n_seq_max=1, n_threads=1, n_threads_batch=1,
                           type_k=type_k, type_v=type_v, flash_attn=type_v not in ("f16", "f32", "bf16"))


@contextmanager
def _runtime(model: str | None, settings: ContextSettings, roles: str,
             chat_template: Path | None = None) -> Iterator[Runtime]:
    from pccpu.service.runtime import Runtime

    template = read_chat_template(chat_template) if chat_template is not None else None
    runtime = Runtime.open(model, settings, roles=roles, chat_template=template)
    try:
        yield runtime
    finally:
        runtime.close()


def _layout(runtime: Runtime, schema: Schema, n_ctx: int) -> SchemaLayout:
    return build_layout(schema, runtime.model, runtime.roles, bos_tokens=runtime.bos_tokens, n_ctx=n_ctx)


_model_option = click.option("--model", "-m", default=None, metavar="MODEL",
                             help="Registry name or .gguf path (default: $PCCPU_MODEL, else the registry default).")
_n_ctx_option = click.option("--n-ctx", type=click.IntRange(min=1), default=DEFAULT_N_CTX, show_default=True,
                             help="Context size the schema and prompts must fit in.")
_roles_option = click.option("--roles", type=click.Choice(ROLE_MODES), default="auto", show_default=True,
                             help="How role tags are rendered: the model's chat template (auto/template), "
                                  "ChatML, or no role text (plain).")
_template_option = click.option("--chat-template", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                                default=None, metavar="FILE",
                                help="A Jinja chat template to use instead of the model's own.")


@click.group()
def schema() -> None:
    """Check PML schemas and prompts, and show a schema's layout."""


@schema.command("check")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@_model_option
@_n_ctx_option
@_roles_option
@_template_option
@click.option("--syntax-only", is_flag=True, help="Parse only: no model, no tokenization, no layout.")
def check(files: tuple[str, ...], model: str | None, n_ctx: int, roles: str, chat_template: Path | None,
          syntax_only: bool) -> None:
    """Check each FILE, a schema or a prompt; prompts are resolved against the schemas given with them.

    Prints one OK line per file and exits 0 when all are valid; otherwise prints the first error and exits 1.
    """
    unique = list(dict.fromkeys(files))  # a file named twice (overlapping globs) is checked once
    loaded = [_load(path) for path in unique]
    schemas: dict[str, _PmlFile] = {}
    for item in loaded:
        if item.schema is not None:
            other = schemas.get(item.schema.name)
            if other is not None and Path(other.path).resolve() != Path(item.path).resolve():
                raise DuplicateNameError(f"schema {item.schema.name!r} is defined by both {other.path!r} and "
                                         f"{item.path!r}", source=item.path)
            schemas.setdefault(item.schema.name, item)
    if syntax_only:
        for item in loaded:
            if item.schema is not None:
                click.echo(f"OK {item.path}: schema {item.schema.name}, "
                           f"{_plural(_module_count(item.schema), 'module')} (syntax only)")
            elif item.prompt is not None:
                click.echo(f"OK {item.path}: prompt for schema {item.prompt.schema}, "
                           f"{_plural(len(item.prompt.refs), 'module reference')} (syntax only)")
        return
    for item in loaded:  # before the model loads: a missing schema needs no tokenizer to be reported
        if item.prompt is not None and item.prompt.schema not in schemas:
            available = ", ".join(repr(name) for name in sorted(schemas)) or "none (give the schema file too)"
            raise UnknownSchemaError(f"the prompt names schema {item.prompt.schema!r}, which is not among the files "
                                     f"given; available schemas: {available}", source=item.path)
    layouts: dict[str, SchemaLayout] = {}
    with _runtime(model, _settings(n_ctx), roles, chat_template) as runtime:

        def layout_of(name: str) -> SchemaLayout:
            if name not in layouts:
                found = schemas[name].schema
                if found is None:
                    raise InternalError(f"{schemas[name].path} was indexed as a schema but holds none")
                layouts[name] = _layout(runtime, found, n_ctx)
            return layouts[name]

        for item in loaded:
            if item.schema is not None:
                layout = layout_of(item.schema.name)
                click.echo(f"OK {item.path}: schema {layout.name}, {_plural(_module_count(item.schema), 'module')}, "
                           f"span {layout.span} positions")
            elif item.prompt is not None:
                layout = layout_of(item.prompt.schema)
                plan = resolve_prompt(layout, item.prompt, runtime.model, runtime.roles, n_ctx=n_ctx)
                click.echo(f"OK {item.path}: prompt for schema {plan.schema}, cached {plan.cached_tokens} + "
                           f"uncached {plan.uncached_tokens} tokens, next position {plan.next_position}")


@schema.command("show")
@click.argument("file", metavar="FILE")
@_model_option
@_n_ctx_option
@_roles_option
@_template_option
@click.option("--type-k", type=click.Choice(sorted(KV_TYPES)), default="f16", show_default=True,
              help="KV cache type of K, for the memory figures.")
@click.option("--type-v", type=click.Choice(sorted(KV_TYPES)), default="f16", show_default=True,
              help="KV cache type of V, for the memory figures.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON description instead of the tree.")
def show(file: str, model: str | None, n_ctx: int, roles: str, chat_template: Path | None, type_k: str, type_v: str,
         as_json: bool) -> None:
    """Show schema FILE: modules, unions and parameters with positions, tokens and KV memory per module.

    A module's KV memory is its own tokens (not those of its nested modules) times the KV bytes per token of the
    model with the chosen K and V types: what its cache entry holds.
    """
    item = _load(file)
    if item.schema is None:
        raise PmlStructureError("this is a prompt; `pccpu schema show` takes a schema file (check prompts with "
                                "`pccpu schema check SCHEMA PROMPT`)", source=file)
    settings = _settings(n_ctx, type_k, type_v)
    with _runtime(model, settings, roles, chat_template) as runtime:
        layout = _layout(runtime, item.schema, n_ctx)
        per_token = settings.kv_bytes_per_token(runtime.model.info)
        model_name = runtime.model.path.name
        window = SlidingWindow.measure(runtime, per_token)
    if as_json:
        data = _json(layout, per_token, model_name, settings)
        if window is not None:
            data["sliding_window"] = window.as_dict()
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(_tree(layout, per_token, model_name, settings)
                   + (f"\n{window.describe(settings.n_ctx)}" if window is not None else ""))


@dataclass(frozen=True)
class SlidingWindow:
    """What a sliding-window model's KV costs: pccpu keeps every cell of every layer (llama.cpp's ``swa_full``), so
    that modules are saved and restored whole (pccpu/engine/swa.py); llama.cpp's default keeps only the window's
    cells of the sliding layers."""

    n_swa: int
    swa_layers: int
    n_layer: int
    n_ubatch: int
    swa_bytes_per_token: float
    per_token: float

    @classmethod
    def measure(cls, runtime: Runtime, per_token: float) -> SlidingWindow | None:
        info = runtime.model.info
        if not info.n_swa:
            return None
        share = runtime.context.swa_kv_share()
        return cls(info.n_swa, round(share * info.n_layer), info.n_layer, runtime.settings.n_ubatch,
                   share * per_token, per_token)

    def default_cells(self, n_ctx: int) -> int:
        """Cells of the sliding layers in a one-sequence llama.cpp context without swa_full (llama-kv-cache-iswa.cpp:
        the window plus a micro-batch, padded to 256)."""
        return min(n_ctx, -(-(self.n_swa + self.n_ubatch) // 256) * 256)

    def context_bytes(self, n_ctx: int, swa_full: bool) -> float:
        swa_cells = n_ctx if swa_full else self.default_cells(n_ctx)
        return n_ctx * (self.per_token - self.swa_bytes_per_token) + swa_cells * self.swa_bytes_per_token

    def describe(self, n_ctx: int) -> str:
        return (f"sliding window: {self.swa_layers} of {self.n_layer} layers see the last {self.n_swa} positions; "
                f"pccpu keeps every cell of them (swa_full) so modules are saved and restored whole: a full "
                f"n_ctx={n_ctx} context is {human_bytes(self.context_bytes(n_ctx, True))} of KV, "
                f"{human_bytes(self.context_bytes(n_ctx, False))} with llama.cpp's default (those layers keep "
                f"{self.default_cells(n_ctx)} cells); stored modules hold every cell either way")

    def as_dict(self) -> dict[str, Any]:
        return {"n_swa": self.n_swa, "swa_layers": self.swa_layers, "n_layer": self.n_layer,
                "swa_kv_bytes_per_token": self.swa_bytes_per_token}


def _kv(mod: ModuleLayout, per_token: float) -> int:
    return round(mod.own_tokens * per_token)


def _cached_total(layout: SchemaLayout, per_token: float) -> tuple[int, int, int]:
    """Modules with a cache entry (the root's own text included), their own tokens, and their KV bytes."""
    cached = [m for m in layout.modules.values() if m.cache and m.own_tokens]
    tokens = sum(m.own_tokens for m in cached)
    return len(cached), tokens, sum(_kv(m, per_token) for m in cached)


def _json(layout: SchemaLayout, per_token: float, model_name: str, settings: ContextSettings) -> dict[str, Any]:
    data = layout.to_dict()
    for entry in data["modules"]:
        entry["kv_bytes"] = _kv(layout.modules[entry["path"]], per_token)
    n_cached, tokens, total = _cached_total(layout, per_token)
    data["model"] = model_name
    data["n_ctx"] = settings.n_ctx
    data["type_k"] = settings.type_k
    data["type_v"] = settings.type_v
    data["kv_bytes_per_token"] = per_token
    data["totals"] = {
        "modules": len(layout.modules) - 1,  # the root is not a module a prompt can name
        "cached_entries": n_cached,
        "cached_tokens": tokens,
        "cached_kv_bytes": total,
        "span_kv_bytes": round(layout.span * per_token),
        "n_ctx_kv_bytes": round(settings.n_ctx * per_token),
    }
    return data


def _tree(layout: SchemaLayout, per_token: float, model_name: str, settings: ContextSettings) -> str:
    def kv_note(mod: ModuleLayout) -> str:
        if not mod.cache:
            return "cache=false (computed per prompt, not stored)"
        return f"KV {human_bytes(_kv(mod, per_token))}"

    header, *body = layout.render_tree(kv_note).split("\n")
    kv_types = f"{settings.type_k}/{settings.type_v}"
    lines = [header, f"  model {model_name}, KV {kv_types}: {human_bytes(per_token)} per token"]
    root = layout.root
    if root.own_tokens:
        lines.append(f"  (root text)  own {root.own_tokens} tokens  KV {human_bytes(_kv(root, per_token))}")
    lines += body
    n_cached, tokens, total = _cached_total(layout, per_token)
    span_bytes = layout.span * per_token
    ctx_bytes = settings.n_ctx * per_token
    ratio = f"{total / span_bytes:.1f}x" if span_bytes else "n/a"
    lines.append(f"total: {_plural(len(layout.modules) - 1, 'module')}, {n_cached} cache entries (root text "
                 f"included), {tokens} tokens, KV {human_bytes(total)}")
    lines.append(f"memory warning: caching every module keeps {human_bytes(total)} of KV, {ratio} the "
                 f"{human_bytes(span_bytes)} of a single prompt's context over the whole schema span "
                 f"({layout.span} positions; a full n_ctx={settings.n_ctx} context is {human_bytes(ctx_bytes)})")
    return "\n".join(lines)
