"""Reading the PML files named on the command line: one error type (``SourceFileError``) for every reason a file
cannot be used, as for ``src=`` files inside a schema."""

from __future__ import annotations

from pathlib import Path

from pccpu.errors import SourceFileError


def read_input_file(path: str | Path) -> str:
    """The file's text, or a :class:`SourceFileError` that says why it cannot be read."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise SourceFileError("no such file", source=path) from None
    except IsADirectoryError:
        raise SourceFileError("this is a directory, not a PML file", source=path) from None
    except UnicodeDecodeError as exc:
        raise SourceFileError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", source=path) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SourceFileError(f"cannot be read: {reason}", source=path) from None


def check_input_file(path: str | Path) -> None:
    """A :class:`SourceFileError` unless ``path`` is a readable file (its text is read later)."""
    if not Path(path).is_file():
        read_input_file(path)  # raises with the reason
