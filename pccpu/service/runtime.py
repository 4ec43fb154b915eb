"""A model ready to serve PML: the loaded GGUF, one context, its tokenizer and its chat roles.

This is the glue between the engine and the text side (PML layout needs a tokenizer and a role renderer).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pccpu.engine import ContextSettings, LlamaContext, LlamaModel, parse_gpu_layers
from pccpu.engine.protocols import Context, Model
from pccpu.errors import ConfigError
from pccpu.templates import ChatRoles

logger = logging.getLogger(__name__)

# How PML role tags are rendered: "template" (the model's own chat template; error if it cannot be split),
# "auto" (the template when the model has one, else no role text at all), "chatml", or "plain" (no role text).
ROLE_MODES = ("auto", "template", "chatml", "plain")


def resolve_model_path(model: str | Path | None) -> Path:
    """A registry name, a .gguf path, or None for $PCCPU_MODEL / the default; fetches registry models if missing."""
    from pccpu.models import resolve_model

    return resolve_model(None if model is None else str(model))


def chat_roles_for(model: Model, mode: str = "auto", template: str | None = None) -> ChatRoles:
    """The role pieces for ``mode``. ``template``: a Jinja chat template to use instead of the model's own (a base
    model's GGUF has none; gemma-3-270m with the Gemma 3 instruction template, for example)."""
    if mode not in ROLE_MODES:
        raise ConfigError(f"roles must be one of {', '.join(ROLE_MODES)}, got {mode!r}")
    if template is not None and mode not in ("auto", "template"):
        raise ConfigError(f"a chat template was given, but roles={mode!r} does not use one: use roles='template'")
    if mode == "plain":
        return ChatRoles.plain()
    if mode == "chatml":
        return ChatRoles.chatml()
    if template is not None and not template.strip():
        raise ConfigError("the chat template given is empty")
    template = template if template is not None else model.chat_template
    if template is None:
        if mode == "template":
            raise ConfigError(f"{model.path.name} has no chat template; use roles='plain' or roles='chatml'")
        logger.warning("%s has no chat template: role tags render as nothing (roles='plain')", model.path.name)
        return ChatRoles.plain()
    bos = model.token_to_piece(model.bos_token, special=True).decode("utf-8", "replace") if model.bos_token >= 0 else ""
    eos = model.token_to_piece(model.eos_token, special=True).decode("utf-8", "replace") if model.eos_token >= 0 else ""
    return ChatRoles.from_template(template, bos_token=bos, eos_token=eos, name=model.path.name)


@dataclass
class Runtime:
    """One model, one context, the settings it was created with, and the text tools that go with them."""

    model: Model
    context: Context
    settings: ContextSettings
    roles: ChatRoles
    bos_tokens: tuple[int, ...] = field(default=())
    reserved_cells: int = 0  # KV cells beyond the context's n_ctx for requests (see ``open``)

    @property
    def n_ctx(self) -> int:
        """Positions a request may use: the n_ctx asked for (llama.cpp pads the context's cells, and the cells
        reserved for resident modules come on top)."""
        return self.settings.n_ctx - self.reserved_cells

    @classmethod
    def open(
        cls,
        model: str | Path | None = None,
        settings: ContextSettings | None = None,
        *,
        roles: str = "auto",
        chat_template: str | None = None,
        n_gpu_layers: int | str = 0,
        reserve_bytes: int = 0,
    ) -> Runtime:
        """Load the model and create its context. ``reserve_bytes``: KV memory on top of ``settings.n_ctx``, as
        whole cells (for resident modules); ``reserved_cells`` says how many. ``chat_template``: instead of the
        model's own (see ``chat_roles_for``)."""
        path = resolve_model_path(model)
        llama_model = LlamaModel(path, n_gpu_layers=parse_gpu_layers(n_gpu_layers))
        try:
            chat_roles = chat_roles_for(llama_model, roles, chat_template)
            settings = settings or ContextSettings()
            reserved = int(reserve_bytes // settings.kv_bytes_per_token(llama_model.info)) if reserve_bytes > 0 else 0
            if reserved:
                settings = dataclasses.replace(settings, n_ctx=settings.n_ctx + reserved)
            context = LlamaContext(llama_model, settings)
        except BaseException:
            llama_model.close()
            raise
        bos = (llama_model.bos_token,) if llama_model.add_bos and llama_model.bos_token >= 0 else ()
        return cls(model=llama_model, context=context, settings=settings, roles=chat_roles, bos_tokens=bos,
                   reserved_cells=reserved)

    def close(self) -> None:
        self.context.close()
        self.model.close()
