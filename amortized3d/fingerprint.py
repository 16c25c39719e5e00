"""One weight fingerprint: a short sha256 hex digest of what determines a model's weights (cache keys).

One construction, two readers of the weights, because the two callers know them at different times:

* :func:`files_fingerprint` reads them on disk without loading them: per file (sorted by relative
  name) its name, size and first and last MiB. Cheap, and it differs for any re-saved weights. The
  text encoder's embedding-cache identity must be known before (and with a warm cache instead of)
  loading the model; the evaluation CLIP's weights file is keyed the same way.
* :func:`tensors_fingerprint` reads them in memory, every byte, with names, dtypes and shapes: SD's
  ``rgb_as_latents`` fit must follow weights changed after loading (a fine-tuned VAE at the same path).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch

DIGEST_CHARS = 16  # 64 bits: a cache-key component, not a security boundary
BOUNDARY_BYTES = 1 << 20


def files_fingerprint(path: str | os.PathLike) -> str:
    """Fingerprint of a weights directory (every file below it) or of one weights file."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for file in files:
        h.update(str(file.relative_to(root)).encode())
        size = file.stat().st_size
        h.update(str(size).encode())
        with open(file, "rb") as f:  # boundary bytes: cheap, and differ for any re-saved weights
            h.update(f.read(BOUNDARY_BYTES))
            if size > 2 * BOUNDARY_BYTES:
                f.seek(-BOUNDARY_BYTES, 2)
                h.update(f.read())
    return h.hexdigest()[:DIGEST_CHARS]


def tensors_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Fingerprint of a state dict: every tensor's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:DIGEST_CHARS]
