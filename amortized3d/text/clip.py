"""Stable Diffusion's CLIP text encoder: pooled [N,E] and token [N,77,E] embeddings.

The generators are conditioned on the pooled output (ScaleDreamer / ATT3D: SD-2.1's text
encoder, E = 1024); the diffusion UNet on the token embeddings. Prompts longer than the
tokenizer's 77 tokens are truncated the way SD pipelines truncate them — the last kept token is
the end-of-text token, whose final hidden state *is* the pooled output — and a warning names them.

The model is loaded lazily: with a warm embedding cache a training run never loads it. The
cache ``identity`` fingerprints the files (``amortized3d.fingerprint``: names, sizes and boundary bytes),
so re-trained or swapped weights at the same path get a new cache entry.
"""
from __future__ import annotations

import json
import warnings
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from amortized3d.fingerprint import files_fingerprint
from amortized3d.sd_loading import (MissingWeightsError, fit_tokenizer_length, freeze, load_component,
                                           missing_weights_message, resolve_device, resolve_dtype)
from amortized3d.text.base import TextEncoder
from amortized3d.text.cache import local_rank_from_env

_MAX_NAMED = 5


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> Tensor:
    """input_ids [N, L] padded to the tokenizer's max length; warns once per call about truncation."""
    max_len = int(tokenizer.model_max_length)
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False).input_ids]
    long = [p for p, n in zip(prompts, lengths) if n > max_len]
    if long:
        named = "; ".join(repr(p[:80] + ("..." if len(p) > 80 else "")) for p in long[:_MAX_NAMED])
        more = f" and {len(long) - _MAX_NAMED} more" if len(long) > _MAX_NAMED else ""
        warnings.warn(f"{len(long)} prompt(s) exceed the text encoder's {max_len} tokens and are truncated "
                      f"(the end-of-text token is kept): {named}{more}", UserWarning, stacklevel=3)
    out = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    return out.input_ids


@torch.no_grad()
def clip_outputs(model: Any, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(pooled [N,E], tokens [N,L,E]) in the model's dtype: pooled = final-layer-norm state at EOS."""
    device = next(model.parameters()).device
    out = model(input_ids.to(device))
    return out.pooler_output, out.last_hidden_state


# One CLIP text model per (model, revision, subfolder) in a process: the generators' pooled-embedding
# encoder and the SD prior's token encoder are the same network, and holding it twice costs 1.35 GiB
# at SD-2.1 size (fp32) for the whole run. Weak values: a model lives as long as a user holds it.
_SHARED_TEXT_MODELS: "weakref.WeakValueDictionary[tuple, Any]" = weakref.WeakValueDictionary()


def _shared_key(name_or_path: str, revision: str | None, subfolder: str) -> tuple:
    local = Path(name_or_path).expanduser()
    return (str(local.resolve()) if local.is_dir() else str(name_or_path), revision, subfolder)


def shared_text_model(name_or_path: str, revision: str | None, subfolder: str = "text_encoder",
                      dtype: torch.dtype | None = None) -> Any | None:
    """The live (frozen) CLIP text model of this model directory, if any, in ``dtype`` if given."""
    model = _SHARED_TEXT_MODELS.get(_shared_key(name_or_path, revision, subfolder))
    if model is None or (dtype is not None and next(model.parameters()).dtype != dtype):
        return None
    return model


def register_text_model(name_or_path: str, revision: str | None, subfolder: str, model: Any) -> Any:
    _SHARED_TEXT_MODELS[_shared_key(name_or_path, revision, subfolder)] = model
    return model


def _snapshot_dir(name_or_path: str, revision: str | None, local_files_only: bool) -> Path | None:
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    try:  # only the cache is consulted for the identity; loading reports missing weights itself
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True,
                                      allow_patterns=["text_encoder/*", "tokenizer/*"]))
    except Exception:
        return None


class CLIPTextEncoder(TextEncoder):
    """Pooled prompt embeddings from the ``text_encoder``/``tokenizer`` subfolders of an SD model."""

    def __init__(self, pretrained_model_name_or_path: str, embedding_dim: int | None = None,
                 revision: str | None = None, local_files_only: bool = False, device: str = "auto",
                 dtype: str = "fp32", subfolder: str = "text_encoder", tokenizer_subfolder: str = "tokenizer"):
        self.name_or_path = str(pretrained_model_name_or_path)
        self.revision, self.local_files_only = revision, bool(local_files_only)
        self.subfolder, self.tokenizer_subfolder = subfolder, tokenizer_subfolder
        self.device = resolve_device(device)
        if device in (None, "auto") and self.device.type == "cuda":  # each rank encodes on its own GPU
            self.device = torch.device("cuda", local_rank_from_env())
        self.dtype = resolve_dtype(dtype, self.device)
        self._declared_dim = None if embedding_dim is None else int(embedding_dim)
        self._model: Any = None
        self._tokenizer: Any = None
        self._identity: str | None = None

    # --- identity and sizes (no weights loaded) ----------------------------------------------------
    @property
    def identity(self) -> str:
        if self._identity is None:
            snap = _snapshot_dir(self.name_or_path, self.revision, self.local_files_only)
            if snap is None:
                raise MissingWeightsError(missing_weights_message(self.name_or_path, self.subfolder))
            parts = [files_fingerprint(snap / self.subfolder), files_fingerprint(snap / self.tokenizer_subfolder)]
            dtype = str(self.dtype).replace("torch.", "")
            self._identity = f"sd-clip-pooled-{self.name_or_path}-{dtype}-{'-'.join(parts)}"
        return self._identity

    @property
    def embedding_dim(self) -> int:
        if self._declared_dim is None:
            self._declared_dim = self._config_dim()
        return self._declared_dim

    def _config_dim(self) -> int:
        snap = _snapshot_dir(self.name_or_path, self.revision, self.local_files_only)
        if snap is None or not (snap / self.subfolder / "config.json").is_file():
            raise MissingWeightsError(missing_weights_message(self.name_or_path, self.subfolder))
        return int(json.loads((snap / self.subfolder / "config.json").read_text())["hidden_size"])

    # --- loading and encoding ------------------------------------------------------------------------
    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import CLIPTextModel, CLIPTokenizer

        common = {"revision": self.revision, "local_files_only": self.local_files_only}
        tokenizer = load_component(CLIPTokenizer, self.name_or_path, self.tokenizer_subfolder, **common)
        model = shared_text_model(self.name_or_path, self.revision, self.subfolder, self.dtype)
        if model is None or next(model.parameters()).device != self.device:
            model = load_component(CLIPTextModel, self.name_or_path, self.subfolder, torch_dtype=self.dtype, **common)
        self._tokenizer = fit_tokenizer_length(tokenizer, model.config)
        hidden = int(model.config.hidden_size)
        if self._declared_dim is not None and hidden != self._declared_dim:
            raise ValueError(f"{self.name_or_path} has a {hidden}-dim text encoder but embedding_dim="
                             f"{self._declared_dim} was configured: set prior.text_encoder.embedding_dim={hidden}")
        self._model = register_text_model(self.name_or_path, self.revision, self.subfolder,
                                          freeze(model).to(self.device))

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        self.load()
        return tokenize(self._tokenizer, prompts)

    def encode_with_tokens(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(pooled [N,E], tokens [N,77,E]) float32 on CPU."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a sequence of prompts, not a single string")
        pooled, tokens = clip_outputs(self._loaded_model(), self.tokenize(prompts))
        return pooled.float().cpu(), tokens.float().cpu()

    def encode(self, prompts: Sequence[str]) -> Tensor:
        return self.encode_with_tokens(prompts)[0]

    def encode_tokens(self, prompts: Sequence[str]) -> Tensor:
        return self.encode_with_tokens(prompts)[1]

    @property
    def token_shape(self) -> tuple[int, int]:
        self.load()
        return int(self._tokenizer.model_max_length), int(self._model.config.hidden_size)

    def _loaded_model(self) -> Any:
        self.load()
        return self._model

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name_or_path!r}, dtype={self.dtype}, device={self.device})"
