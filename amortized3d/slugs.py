"""The one slugifier for file names made from text (videos, grids, exports, embedding-cache files).

:func:`readable` is the rule: lower case, every run of other characters than ``a-z0-9`` becomes one
``_`` (so ``__`` never occurs inside it and can separate fields). A readable stem is not unique:
"a red cube 🎲" and "A red cube!" both read ``a_red_cube``. So :func:`slugify` ends every stem in
12 hex digits of the text's sha256 (48 bits: for 100k prompts the chance of any collision is ~2e-5),
which keeps names stable whatever other prompts are written next to them. Names that carry their own
unique key (the embedding cache: sha256 of encoder and prompts) use :func:`readable` alone.
"""
from __future__ import annotations

import hashlib
import re

HASH_CHARS = 12
MAX_READABLE = 60


def readable(text: str, max_len: int = MAX_READABLE, fallback: str = "prompt") -> str:
    """The file-name-safe readable part of ``text`` (``[a-z0-9_]``, at most ``max_len``; not unique)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len].rstrip("_") or fallback


def slugify(prompt: str) -> str:
    """``<readable part>_<12 hex of sha256(prompt)>``: file-name safe and unique per prompt."""
    return f"{readable(prompt)}_{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:HASH_CHARS]}"
