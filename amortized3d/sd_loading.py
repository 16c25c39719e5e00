"""Loading Stable Diffusion components (diffusers layout) from a hub id or a local directory.

Shared by ``priors/`` (UNet, VAE, scheduler) and ``text/clip.py`` (tokenizer, text encoder), so it
sits below both (a text encoder never imports a prior).

Every component is loaded by subfolder with its library's ``from_pretrained`` (what
``StableDiffusionPipeline`` does), so a hub id, a snapshot in the Hugging Face cache and a
directory written by ``save_pretrained`` all go through the same code. Weights cannot be
downloaded on machines without internet: a missing model gives one error that names the id or
path and says how to provide it.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
ATTENTION = ("sdpa", "slicing", "xformers")
SUBFOLDERS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")


class MissingWeightsError(FileNotFoundError):
    """A Stable Diffusion component could not be found locally or downloaded."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA (the frozen networks only run forward), fp32 on CPU (fp16 kernels
    are slow or missing there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def looks_like_path(name_or_path: str) -> bool:
    """A local path rather than a hub id: absolute, ``./``/``../``/``~``-relative, an existing file or
    directory, or anything but the hub's ``name`` / ``org/name`` shape (one slash at most)."""
    text = str(name_or_path)
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or text in (".", "..") or "\\" in text:
        return True
    if Path(text).expanduser().is_absolute() or Path(text).expanduser().exists():
        return True
    return text.count("/") > 1 or text.endswith("/")


def missing_weights_message(name_or_path: str, subfolder: str, err: BaseException | None = None) -> str:
    reason = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})" if err else ""
    if looks_like_path(name_or_path):
        local = Path(name_or_path).expanduser()
        if not local.exists():
            state = "does not exist"
        elif not local.is_dir():
            state = "is not a directory"
        elif not (local / subfolder).is_dir():
            state = f"has no {subfolder}/ subfolder"
        else:
            state = f"has a {subfolder}/ subfolder that could not be loaded"
        return (f"cannot load Stable Diffusion component {subfolder!r} from the local directory {local}: it "
                f"{state}{reason}. Pass a diffusers directory with subfolders {', '.join(SUBFOLDERS)} (e.g. one "
                f"written by StableDiffusionPipeline.save_pretrained): prior.pretrained_model_name_or_path="
                f"/path/to/model, or a hub id such as runwayml/stable-diffusion-v1-5 that is in the Hugging "
                f"Face cache (~/.cache/huggingface or $HF_HOME).")
    return (f"cannot load Stable Diffusion component {subfolder!r} of the hub id {name_or_path!r}{reason}: it is "
            f"not in the Hugging Face cache (~/.cache/huggingface or $HF_HOME) and weights cannot be downloaded "
            f"on this machine. Either (a) run `huggingface-cli download {name_or_path}` on a machine with "
            f"internet and copy its cache here, or (b) pass a local diffusers directory with subfolders "
            f"{', '.join(SUBFOLDERS)}: prior.pretrained_model_name_or_path=/path/to/model (e.g. one written by "
            f"StableDiffusionPipeline.save_pretrained).")


def load_component(cls: Any, name_or_path: str, subfolder: str, revision: str | None = None,
                   local_files_only: bool = False, **kwargs: Any) -> Any:
    """``cls.from_pretrained(name_or_path, subfolder=...)`` with the missing-weights error above."""
    local = Path(str(name_or_path)).expanduser()
    looks_local = local.is_absolute() or str(name_or_path).startswith(".") or local.exists()
    if looks_local and not (local / subfolder).is_dir():
        raise MissingWeightsError(missing_weights_message(str(name_or_path), subfolder))
    try:
        return cls.from_pretrained(str(local) if looks_local else name_or_path, subfolder=subfolder,
                                   revision=revision, local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError) as err:  # huggingface_hub/transformers raise OSError subclasses offline
        raise MissingWeightsError(missing_weights_message(str(name_or_path), subfolder, err)) from err


def fit_tokenizer_length(tokenizer: Any, text_encoder_config: Any) -> Any:
    """Cap ``tokenizer.model_max_length`` at the text encoder's ``max_position_embeddings``.

    A tokenizer saved without ``model_max_length`` loads with transformers' "unbounded" sentinel
    (int(1e30)); padding to it overflows (``OverflowError: int too big to convert``), and any length
    above the encoder's position table would index past it. The encoder's table is the real limit.
    """
    limit = int(text_encoder_config.max_position_embeddings)
    length = getattr(tokenizer, "model_max_length", None)
    if length is None or int(length) > limit:
        tokenizer.model_max_length = limit
    return tokenizer


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def configure_attention(unet: nn.Module, attention: str) -> None:
    """``sdpa`` (diffusers' default on torch 2: fused, memory-efficient), ``slicing`` (lowest memory)
    or ``xformers`` (falls back to sdpa with a warning where it is not installed)."""
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}; valid: {', '.join(ATTENTION)}")
    if attention == "slicing":
        unet.set_attention_slice("auto")
    elif attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:  # ImportError / ModuleNotFoundError / unsupported device
            warnings.warn(f"xformers unavailable ({err}); using torch scaled_dot_product_attention",
                          RuntimeWarning, stacklevel=2)


def load_unet_vae_scheduler(name_or_path: str, dtype: torch.dtype, revision: str | None = None,
                            local_files_only: bool = False, load_vae: bool = True) -> tuple[Any, Any, Any]:
    """(frozen unet, frozen vae or None, scheduler) in ``dtype``; the VAE is skipped when unused."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    common = {"revision": revision, "local_files_only": local_files_only}
    scheduler = load_component(DDPMScheduler, name_or_path, "scheduler", **common)
    unet = freeze(load_component(UNet2DConditionModel, name_or_path, "unet", torch_dtype=dtype, **common))
    vae = None
    if load_vae:
        vae = freeze(load_component(AutoencoderKL, name_or_path, "vae", torch_dtype=dtype, **common))
    return unet, vae, scheduler
