"""PML, the Prompt Markup Language: parse schemas and prompts, lay out positions, plan what llama.cpp decodes.

Public API::

    parse_schema(text_or_path, *, source=None, allowed_roots=()) -> Schema
    parse_prompt(text, *, source=None) -> Prompt
    build_layout(schema, tokenizer, roles, *, bos_tokens=(), n_ctx=None) -> SchemaLayout
    resolve_prompt(layout, prompt, tokenizer, roles, *, n_ctx=None) -> PromptPlan

**Whitespace rule.** A text chunk is the text between two pieces of markup (elements and role tags; comments are
transparent, CDATA is ordinary text). In each chunk, the whitespace-only lines at its start and end (the XML
indentation around it) are removed and the remaining lines are dedented by their common indentation (the first line
counts only if it starts a line). Spaces within a line, also next to a tag on the same line, are kept; a chunk of
only whitespace disappears. ``src=`` files are one chunk each, trimmed the same way. Role tags and the text around
them form one chunk for tokenization.

**Literal characters.** ``&lt;``, ``&amp;`` and CDATA work as in XML. A ``<`` that cannot start markup (``0 <= x``)
and an ``&`` that starts no entity (``a & b``) are also taken literally; ``<`` followed by a letter is a tag.

**Positions.** Each schema chunk gets a fixed range when the schema is laid out (``bos_tokens`` first at 0, then
the schema in document order; union members share the union's start and the union spans its longest member; a
parameter reserves ``length`` positions). A prompt is then placed with a cursor, one past the last position placed
(llama.cpp decodes a sequence only at ``pos_max + 1``): a cached piece, a contiguous run of one module's own cells,
keeps its schema positions when they start at or after the cursor (gaps are harmless for RoPE) and is otherwise
shifted right to the cursor; uncached tokens (parameter arguments, ``cache="false"`` modules, prompt text between
references, trailing text) are decoded at the cursor. An argument of n tokens therefore takes the first n positions
of its slot and the rest is a gap. Prompt text between references goes right after the subtree of the reference
before it (text before the first reference: right before that module); text after the last reference is trailing
text after the whole schema. Nothing is appended after a prompt: the generation prompt is the caller's choice.
"""

from __future__ import annotations

from pccpu.pml.layout import (
    ModuleLayout,
    NestedModule,
    ParameterSlot,
    SchemaLayout,
    TextChunk,
    UnionLayout,
    build_layout,
)
from pccpu.pml.plan import CachedPiece, PromptPlan, UncachedPiece, resolve_prompt
from pccpu.pml.prompt import ModuleRef, Prompt, PromptText, parse_prompt
from pccpu.pml.schema import Module, Parameter, Schema, Text, Union, parse_schema

__all__ = [
    "CachedPiece",
    "Module",
    "ModuleLayout",
    "ModuleRef",
    "NestedModule",
    "Parameter",
    "ParameterSlot",
    "Prompt",
    "PromptPlan",
    "PromptText",
    "Schema",
    "SchemaLayout",
    "Text",
    "TextChunk",
    "UncachedPiece",
    "Union",
    "UnionLayout",
    "build_layout",
    "parse_prompt",
    "parse_schema",
    "resolve_prompt",
]
