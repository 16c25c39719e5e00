"""An open_clip model as the evaluation encoder: images and prompts -> unit-norm embeddings.

``pretrained`` is an open_clip tag (``openai``: weights from the Hugging Face cache, downloaded
on first use), a local weights file (``/path/to/open_clip_pytorch_model.bin``), or ``None`` for
random weights (smoke tests; seeded, so two runs agree). The text side implements
:class:`TextEncoder`, so prompt embeddings go through the project's on-disk cache.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from amortized3d.fingerprint import files_fingerprint
from amortized3d.text.base import TextEncoder

log = logging.getLogger(__name__)


class ClipWeightsError(RuntimeError):
    """The requested CLIP weights are neither cached nor downloadable."""


def _register_configs(extra_dirs: Sequence[str | Path] = ()) -> None:
    import open_clip

    for d in extra_dirs:  # e.g. the tests' random-weight a3d-tiny-clip (tests/clip_configs)
        if Path(d) not in getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", []):
            open_clip.add_model_config(Path(d))


def _weights_identity(pretrained: str | None, seed: int) -> str:
    """What determines the weights (keys the embedding cache)."""
    if pretrained is None:
        return f"random-seed{seed}"
    if Path(pretrained).is_file():  # a local file: its content decides (size + boundary bytes are enough)
        return f"file-{files_fingerprint(pretrained)}"
    return pretrained


class ClipEncoder(TextEncoder):
    def __init__(self, model: str = "ViT-B-16", pretrained: str | None = "openai", device: str = "cpu",
                 cache_dir: str | None = None, seed: int = 0, config_dirs: Sequence[str] = (),
                 image_batch: int = 64):
        import open_clip

        _register_configs(config_dirs)
        if model not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model!r}; valid names include ViT-B-16, ViT-L-14 "
                             f"(all: open_clip.list_models(); more with config_dirs=[DIR of model configs])")
        self.model_name, self.pretrained, self.device = model, pretrained, torch.device(device)
        self.image_batch = int(image_batch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random weights (pretrained=None) are reproducible
            try:
                self.model = open_clip.create_model(model, pretrained=pretrained, device=self.device,
                                                    cache_dir=cache_dir, require_pretrained=pretrained is not None)
            except RuntimeError as e:
                raise ClipWeightsError(self._missing_weights_message(e)) from e
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        cfg = self.model.visual.preprocess_cfg
        self.image_size = tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        self.embedding_dim = int(open_clip.get_model_config(model)["embed_dim"])
        self.identity = f"open_clip-{model}-{_weights_identity(pretrained, seed)}"

    def _missing_weights_message(self, error: Exception | str) -> str:
        import open_clip

        name, tag = self.model_name, self.pretrained
        error = str(error).rstrip(". ")
        looks_like_path = any(sep in str(tag) for sep in ("/", "\\")) or str(tag).endswith((".bin", ".pt", ".pth",
                                                                                             ".safetensors"))
        if looks_like_path:
            problem = (f"CLIP weights file {tag!r} for open_clip model {name!r} does not exist or cannot be "
                       f"loaded ({error})")
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            problem = (f"could not load CLIP weights for open_clip model {name!r}, pretrained={tag!r} "
                       f"(known tags for {name}: {', '.join(tags) or 'none'}): {error}")
        return (f"{problem}. To provide them offline: either put them in the Hugging Face cache (run "
                f"open_clip.create_model({name!r}, pretrained=<tag>) once with network, then copy "
                f"~/.cache/huggingface or point HF_HOME / evaluator.cache_dir at it), or download the weights "
                f"file and pass evaluator.pretrained=/path/to/open_clip_pytorch_model.bin. "
                f"evaluator.pretrained=null evaluates with random weights (smoke tests only).")

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings [N, D] (float32, CPU)."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a sequence of prompts, not a single string")
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()

    def preprocess(self, images: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] -> the model's input (bicubic resize, CLIP normalisation)."""
        x = images.to(self.device, torch.float32).clamp(0, 1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return (x.clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings [N, D] (float32, CPU), in batches of ``image_batch``."""
        out = [F.normalize(self.model.encode_image(self.preprocess(chunk)).float(), dim=-1).cpu()
               for chunk in images.split(self.image_batch)]
        return torch.cat(out) if out else torch.zeros(0, self.embedding_dim)
