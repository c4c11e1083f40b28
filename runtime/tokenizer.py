"""Text <-> token ids with the model's own tokenizer.json (the `tokenizers` library, no torch)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from hmoe.runtime.errors import HmoeError


def load_tokenizer(source: str | Path | bytes) -> Tokenizer:
    """From a model folder, a tokenizer.json path, or the file's bytes (as kept in a weight pack)."""
    try:
        if isinstance(source, bytes):
            return Tokenizer.from_str(source.decode("utf-8"))
        path = Path(source)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise HmoeError("tokenizer_missing", f"{path}: no tokenizer.json; pass token ids instead of text")
        return Tokenizer.from_file(str(path))
    except HmoeError:
        raise
    except Exception as exc:  # the tokenizers library raises bare Exceptions on malformed files
        raise HmoeError("tokenizer_invalid", f"tokenizer.json could not be read: {exc}") from None
