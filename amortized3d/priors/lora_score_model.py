"""ProlificDreamer's score model: a LoRA of the prior's own UNet plus a camera embedding.

eps_phi(x_t, t, y, c) = UNet_{pretrained + LoRA}(x_t, t, tokens(y), time_emb + W c)   (App. F):

- LoRA (peft, via ``unet.add_adapter``) on the attention projections; B starts at zero, so phi
  starts as the pretrained model. The LoRA parameters are float32 even under an fp16 UNet (peft
  casts the layer input to the LoRA dtype and the sum back), so Adam updates of ~1e-4 * lr are
  not lost to fp16 rounding.
- Camera (c2w, 16 numbers) -> Linear(16, time_embed_dim) added to the time embedding through the
  UNet's ``class_embedding`` slot (threestudio does the same); zero-initialised, i.e. neutral at
  the start; dropped (zeroed) 10% of the time by ``ScoreModel.loss``.
- The UNet is a *structural* copy of the prior's whose frozen weights are the same tensors
  (``deepcopy`` with the base parameters pre-seeded in the memo): no second copy of ~0.9 B
  parameters in memory, and the prior's own UNet never sees the adapter. Frozen weights are
  reported by ``frozen_state_keys`` so checkpoints hold only the LoRA and camera weights.
- ``torch.func.jvp`` (L²-VSD) has no forward-mode rule for fused attention kernels, so
  ``forward_ad()`` switches this copy to the classic attention processor while it runs.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from amortized3d.priors.score_models import CAMERA_DIM, PredictionType, ScoreModel

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py


class CameraEmbedding(nn.Module):
    """Linear(16 -> time_embed_dim), zero-initialised, in float32 whatever the UNet's dtype."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(CAMERA_DIM, out_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, camera: Tensor) -> Tensor:
        return self.proj(camera.to(self.proj.weight.dtype))


class LoRAScoreModel(ScoreModel):
    def __init__(self, rank: int = 4, alpha: float | None = None, target_modules: Sequence[str] = LORA_TARGETS,
                 camera_condition: bool = True, prediction_type: PredictionType = "epsilon",
                 camera_dropout: float = 0.1, unet: nn.Module | None = None):
        super().__init__(prediction_type, camera_dropout)
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)  # alpha = rank: LoRA scale 1
        self.target_modules = list(target_modules)
        self.camera_condition = bool(camera_condition)
        self.unet: nn.Module | None = None
        self.base_dtype = torch.float32
        if unet is not None:
            self.attach(unet)

    # --- construction -----------------------------------------------------------------------------
    def bind_prior(self, prior) -> None:
        super().bind_prior(prior)
        if self.unet is None:
            base = getattr(prior, "unet", None)
            if not isinstance(base, nn.Module):
                raise TypeError(f"LoRAScoreModel fine-tunes the prior's UNet, but {type(prior).__name__} has none; "
                                "use a score model trained from scratch (SmallUNetScoreModel) with this prior")
            self.attach(base)

    def attach(self, base_unet: nn.Module) -> None:
        """Adapter + camera embedding on a copy of ``base_unet`` that shares its frozen weights."""
        from peft import LoraConfig

        shared = {id(t): t for t in itertools.chain(base_unet.parameters(), base_unet.buffers())}
        unet = copy.deepcopy(base_unet, memo=shared)
        unet.requires_grad_(False)
        self.base_dtype = next(base_unet.parameters()).dtype
        unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights=True,
                                    target_modules=self.target_modules))
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
        if self.camera_condition:
            unet.class_embedding = CameraEmbedding(int(unet.time_embedding.linear_2.out_features))
        self.unet = unet

    def _unet(self) -> nn.Module:
        if self.unet is None:
            raise RuntimeError("LoRAScoreModel has no UNet yet: pass unet= or let the guidance bind_prior()")
        return self.unet

    # --- the ScoreModel interface -----------------------------------------------------------------
    def text_condition(self, text_emb: Tensor | None, prompts: Sequence[str], prior) -> Tensor:
        # ProlificDreamer (threestudio): the LoRA sees the view-independent prompt's CLIP tokens.
        return prior.prompt_embeddings(list(prompts))

    def model_output(self, x_t: Tensor, t: Tensor, cond: Tensor | None, camera: Tensor | None) -> Tensor:
        unet = self._unet()
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(n).long()
        if cond is None:
            raise ValueError("LoRAScoreModel needs token embeddings [N,L,E] as cond (see text_condition)")
        kwargs = {}
        if self.camera_condition:
            kwargs["class_labels"] = (torch.zeros(n, CAMERA_DIM, device=x_t.device) if camera is None
                                      else camera.reshape(n, CAMERA_DIM))
        out = unet(x_t.to(self.base_dtype), t, encoder_hidden_states=cond.to(self.base_dtype), **kwargs).sample
        return out.to(x_t.dtype)

    def last_layer_names(self) -> list[str]:
        """The LoRA factors of the adapted layer nearest the output (the last one in module order)."""
        names = [n for n in self.trainable_parameters() if "lora_" in n]
        if not names:
            return []
        last = names[-1].split(".lora_")[0]
        return [n for n in names if n.startswith(last + ".lora_")]

    def frozen_state_keys(self) -> set[str]:
        trainable = set(self.trainable_parameters())
        return {k for k in self.state_dict() if k not in trainable}

    @contextlib.contextmanager
    def forward_ad(self) -> Iterator[None]:
        from diffusers.models.attention_processor import AttnProcessor

        unet = self._unet()
        saved = unet.attn_processors
        unet.set_attn_processor(AttnProcessor())
        try:
            yield
        finally:
            unet.set_attn_processor(saved)

    # --- export -----------------------------------------------------------------------------------
    def save_lora(self, directory: str | Path) -> Path:
        """diffusers' LoRA format (``pytorch_lora_weights.safetensors``, loadable with
        ``pipe.load_lora_weights``) plus ``camera_embedding.safetensors``."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        unet = self._unet()
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
        if self.camera_condition:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in unet.class_embedding.state_dict().items()},
                      str(directory / "camera_embedding.safetensors"))
        return directory
