"""The one slugifier for file names made from prompts (videos, grids, exports).

A readable stem is not unique: "a red cube 🎲" and "A red cube!" both read ``a_red_cube``. So
every stem ends in 12 hex digits of the prompt's sha256 (48 bits: for 100k prompts the chance of
any collision is ~2e-5), which keeps names stable whatever other prompts are written next to them.
"""
from __future__ import annotations

import hashlib
import re

HASH_CHARS = 12
MAX_READABLE = 60


def slugify(prompt: str) -> str:
    """``<readable part>_<12 hex of sha256(prompt)>``: file-name safe and unique per prompt."""
    readable = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:MAX_READABLE].rstrip("_") or "prompt"
    return f"{readable}_{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:HASH_CHARS]}"
