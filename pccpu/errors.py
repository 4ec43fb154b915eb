"""Every error pccpu raises on purpose. All of them derive from :class:`PccpuError`.

    PccpuError
    ├── ConfigError                 bad setting, environment variable or option value
    │   └── OptionError             an unknown or invalid request option (names the valid ones)
    ├── ModelError                  a model that cannot be found, fetched, verified or loaded
    │   ├── UnknownModelError       a name that is neither in the registry nor a path to a .gguf
    │   ├── ModelFetchError         the package registry is unreachable or a download failed
    │   ├── ModelVerifyError        a file whose sha256 is not the registry's
    │   └── UnsupportedModelError   a GGUF pccpu cannot serve (architecture, missing metadata)
    ├── EngineError                 a llama.cpp call was refused or failed
    │   ├── InvalidArgumentError    an argument that would make llama.cpp abort the process
    │   ├── ContextOverflowError    tokens that do not fit the context (n_ctx) or the batch (n_batch)
    │   ├── NoKvSlotError           llama_decode found no free KV cell (return code 1; recoverable)
    │   ├── DecodeError             llama_decode failed otherwise (invalid batch, aborted, compute error)
    │   └── StateError              a sequence state that cannot be saved or restored
    │       └── WindowLostError     a sliding-window sequence that no longer holds the cells a decode needs
    ├── PmlError                    a schema or prompt that pccpu cannot accept (``.source`` names the file)
    │   ├── PmlSyntaxError          malformed XML (with line and column)
    │   ├── PmlSecurityError        DTDs, entity declarations, src= outside the allowed folders
    │   ├── UnknownSchemaError      a prompt names a schema that was not added
    │   ├── UnknownModuleError      a module or union member that does not exist (lists the valid ones)
    │   ├── UnionConflictError      two members of one union selected
    │   ├── ParameterError          bad parameter declaration, unknown parameter, argument too long
    │   ├── DuplicateNameError      two selectable modules with one name in one scope
    │   ├── InvalidNameError        a module name outside ^[a-zA-Z_][a-zA-Z0-9_\\-.]*$
    │   ├── SourceFileError         a src= file that is missing, unreadable or not UTF-8
    │   ├── PmlStructureError       an element or attribute in a place PML does not allow
    │   └── LayoutOverflowError     a schema or prompt whose positions exceed the model's context
    ├── BusyError                   a PromptCache called while another call (or an unfinished answer) runs
    ├── SessionError                a session that was closed, or that belongs to another PromptCache
    ├── TemplateError               a chat template that cannot be split into role prefixes and suffixes
    ├── InternalError               a broken invariant inside pccpu: a bug to report, never the caller's fault
    └── StoreError                  the module store cannot be read or written
        └── CorruptEntryError       a stored module with a bad magic, version, checksum, key or metadata

Who can fix what: ConfigError, OptionError, PmlError and SessionError are the caller's to fix (the message says
how); ModelError and StoreError concern files on this machine; EngineError means llama.cpp refused something that
pccpu should have prevented, except NoKvSlotError and ContextOverflowError, which a larger n_ctx fixes. No other
exception type leaves the library on purpose.

Lower layers raise these directly; the CLI turns them into messages in one place.
"""

from __future__ import annotations

from pathlib import Path


class PccpuError(Exception):
    """Base class of every error pccpu raises on purpose."""


class ConfigError(PccpuError):
    pass


class OptionError(ConfigError):
    pass


class ModelError(PccpuError):
    pass


class UnknownModelError(ModelError):
    pass


class ModelFetchError(ModelError):
    pass


class ModelVerifyError(ModelError):
    pass


class UnsupportedModelError(ModelError):
    pass


class EngineError(PccpuError):
    pass


class InvalidArgumentError(EngineError):
    pass


class ContextOverflowError(EngineError):
    pass


class NoKvSlotError(EngineError):
    pass


class DecodeError(EngineError):
    pass


class DecodeInterrupted(DecodeError):
    """A decode stopped by ``interrupt()`` from another thread (type-ahead yielding to a keystroke)."""


class StateError(EngineError):
    pass


class WindowLostError(StateError):
    """A sliding-window model's sequence lost cells that a decode (or a save) needs: llama.cpp reuses the cells of
    its SWA layers once no later token of the sequence can see them. Rebuild the sequence (restore its modules)."""


class PmlError(PccpuError):
    """A schema or prompt problem. ``source`` is the file it came from, when there is one."""

    def __init__(self, message: str, *, source: str | Path | None = None) -> None:
        self.source = str(source) if source is not None else None
        self.detail = message
        super().__init__(f"{self.source}: {message}" if self.source else message)


class PmlSyntaxError(PmlError):
    def __init__(
        self, message: str, *, source: str | Path | None = None, line: int | None = None, column: int | None = None
    ) -> None:
        self.line = line
        self.column = column
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__(where + message, source=source)


class PmlSecurityError(PmlError):
    pass


class UnknownSchemaError(PmlError):
    pass


class UnknownModuleError(PmlError):
    pass


class UnionConflictError(PmlError):
    pass


class ParameterError(PmlError):
    pass


class DuplicateNameError(PmlError):
    pass


class InvalidNameError(PmlError):
    pass


class SourceFileError(PmlError):
    pass


class PmlStructureError(PmlError):
    pass


class LayoutOverflowError(PmlError):
    pass


class BusyError(PccpuError):
    pass


class SessionError(PccpuError):
    pass


class TemplateError(PccpuError):
    pass


class InternalError(PccpuError):
    pass


class StoreError(PccpuError):
    pass


class CorruptEntryError(StoreError):
    pass
