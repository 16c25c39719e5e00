"""ProlificDreamer's score model: a LoRA of a pretrained UNet plus a camera embedding.

eps_phi(x_t, t, y, c) = UNet_{pretrained + LoRA}(x_t, t, tokens(y), time_emb + MLP(c))   (App. F:
"The camera pose c is fed into a 2-layer MLP and then added to timestep embedding"):

- The base is the prior's own UNet (default) or, as threestudio's ``pretrained_model_name_or_path_lora``
  and ProlificDreamer's ``--v_pred`` do (SD-2.1 768 px, a v-model, under a 2.1-base prior), a separate
  diffusers model (``base_model_name_or_path``). Only its UNet is loaded: the VAE (x0 space), text
  tokens and noise schedule are the prior's, and are checked to fit.
- Its prediction type is the base UNet's (``auto``, read from the base's scheduler config). A LoRA
  starts as its base, so reading an eps network as v (or v as eps) would make eps_phi wrong from
  step 0: an explicit ``prediction_type`` that differs from the base's is an error at build time.
- LoRA (peft, via ``unet.add_adapter``) on the attention projections; B starts at zero, so phi
  starts as the pretrained model. The LoRA parameters are float32 even under an fp16 UNet (peft
  casts the layer input to the LoRA dtype and the sum back), so Adam updates of ~1e-4 * lr are
  not lost to fp16 rounding.
- Camera (c2w, 16 numbers) -> Linear(16, D) -> SiLU -> Linear(D, D), D = time_embed_dim, added to the
  time embedding through the UNet's ``class_embedding`` slot: the 2-layer MLP of App. F and of both
  public codes (ProlificDreamer ``camera_emb``, threestudio ``TimestepEmbedding(16, 1280)``). Unlike
  them its last layer is zero-initialised, so that eps_phi equals the base exactly at step 0; dropped
  (zeroed) 10% of the time by ``ScoreModel.loss``.
- On the prior's UNet, the adapted UNet is a *structural* copy whose frozen weights are the same
  tensors (``deepcopy`` with the base parameters pre-seeded in the memo): no second copy of ~0.9 B
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
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from amortized3d.priors.score_models import CAMERA_DIM, PREDICTION_TYPES, ScoreModel

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py
PredictionTypeOrAuto = Literal["auto", "epsilon", "v_prediction"]


class CameraEmbedding(nn.Module):
    """Linear(16 -> D) -> SiLU -> Linear(D -> D) (diffusers' ``TimestepEmbedding``, as threestudio),
    last layer zero-initialised (neutral at the start), float32 whatever the UNet's dtype."""

    def __init__(self, out_dim: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        self.mlp = TimestepEmbedding(CAMERA_DIM, out_dim)
        nn.init.zeros_(self.mlp.linear_2.weight)
        nn.init.zeros_(self.mlp.linear_2.bias)

    def forward(self, camera: Tensor) -> Tensor:
        return self.mlp(camera.to(self.mlp.linear_1.weight.dtype))


def resolve_prediction_type(requested: str, base: str | None, base_name: str) -> str:
    """The score model's prediction type: the base UNet's; ``requested`` may only restate it."""
    if requested not in ("auto", *PREDICTION_TYPES):
        raise ValueError(f"prediction_type must be 'auto', 'epsilon' or 'v_prediction', got {requested!r}")
    if base is not None and base not in PREDICTION_TYPES:
        raise ValueError(f"{base_name} has unsupported prediction_type {base!r}")
    if requested == "auto":
        if base is None:
            raise ValueError(f"prediction_type='auto' needs the base UNet's prediction type; {base_name} gives none "
                             "(pass base_prediction_type= or set prediction_type explicitly)")
        return base
    if base is not None and requested != base:
        raise ValueError(f"score_model.prediction_type={requested!r} but its base UNet ({base_name}) predicts "
                         f"{base!r}: a LoRA starts as its base, so its output would be misread from step 0. "
                         f"Use prediction_type=auto (or {base!r}), or a {requested} base model "
                         "(score_model.base_model_name_or_path)")
    return requested


class LoRAScoreModel(ScoreModel):
    def __init__(self, rank: int = 4, alpha: float | None = None, target_modules: Sequence[str] = LORA_TARGETS,
                 camera_condition: bool = True, prediction_type: PredictionTypeOrAuto = "auto",
                 camera_dropout: float = 0.1, unet: nn.Module | None = None,
                 base_prediction_type: str | None = None, base_model_name_or_path: str | None = None,
                 revision: str | None = None, local_files_only: bool = False, prior=None):
        """Built on ``unet`` when given, else on ``prior`` (its own UNet, or ``base_model_name_or_path``
        checked against it); configs build it as a Hydra ``_partial_`` factory called with the prior."""
        super().__init__("epsilon", camera_dropout, prior=prior)
        if prediction_type not in ("auto", *PREDICTION_TYPES):
            raise ValueError(f"prediction_type must be 'auto', 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.requested_prediction_type = prediction_type
        self.prediction_type = prediction_type  # resolved against the base UNet in attach()
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)  # alpha = rank: LoRA scale 1
        self.target_modules = list(target_modules)
        self.camera_condition = bool(camera_condition)
        self.base_model_name_or_path = None if not base_model_name_or_path else str(base_model_name_or_path)
        self.revision, self.local_files_only = revision, bool(local_files_only)
        self.unet: nn.Module | None = None
        self.base_dtype = torch.float32
        self._last_layer: list[str] | None = None
        if unet is not None:
            self.attach(unet, base_prediction_type, "the given unet")
        elif prior is not None:
            self._build_on(prior)

    # --- construction -----------------------------------------------------------------------------
    def _build_on(self, prior) -> None:
        """The adapter on the prior's UNet (weights shared) or on ``base_model_name_or_path``'s."""
        if self.base_model_name_or_path is not None:
            unet, prediction_type = self._load_separate_base(prior)
            self.attach(unet, prediction_type, self.base_model_name_or_path, share_weights=False)
            return
        base = getattr(prior, "unet", None)
        if not isinstance(base, nn.Module):
            raise TypeError(f"LoRAScoreModel fine-tunes the prior's UNet, but {type(prior).__name__} has none; "
                            "use a score model trained from scratch (SmallUNetScoreModel) with this prior")
        name = f"the prior's UNet, {getattr(prior, 'name_or_path', type(prior).__name__)}"
        self.attach(base, getattr(prior, "prediction_type", None), name)

    def _load_separate_base(self, prior) -> tuple[nn.Module, str]:
        """The UNet (frozen, the prior's dtype) and prediction type of ``base_model_name_or_path``,
        checked to live in the prior's latent space, token space and noise schedule."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        from amortized3d.priors.schedule import NoiseSchedule
        from amortized3d.sd_loading import freeze, load_component

        name = self.base_model_name_or_path
        common = {"revision": self.revision, "local_files_only": self.local_files_only}
        scheduler = load_component(DDPMScheduler, name, "scheduler", **common)
        unet = freeze(load_component(UNet2DConditionModel, name, "unet",
                                     torch_dtype=getattr(prior, "dtype", torch.float32), **common))
        ours = NoiseSchedule.from_diffusers(scheduler).alphas_cumprod
        theirs = prior.schedule.alphas_cumprod
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs.to(ours), rtol=1e-5, atol=1e-6):
            raise ValueError(f"score-model base {name} has a different noise schedule from the prior "
                             f"{getattr(prior, 'name_or_path', '')}: the score model must diffuse like the prior")
        prior_unet = getattr(prior, "unet", None)
        if prior_unet is not None:
            for key in ("in_channels", "cross_attention_dim"):  # the prior's VAE latents and text tokens
                a, b = unet.config.get(key), prior_unet.config.get(key)
                if a != b:
                    raise ValueError(f"score-model base {name} has {key}={a} but the prior's UNet has {b}: "
                                     "it must take the prior's latents and token embeddings")
        return unet, scheduler.config.prediction_type

    def attach(self, base_unet: nn.Module, base_prediction_type: str | None = None,
               base_name: str = "the base UNet", share_weights: bool = True) -> None:
        """Adapter + camera embedding on ``base_unet`` (by default on a copy that shares its frozen
        weights); the prediction type becomes the base's (``auto``) or must equal it."""
        from peft import LoraConfig

        self.prediction_type = resolve_prediction_type(self.requested_prediction_type, base_prediction_type,
                                                       base_name)
        if share_weights:
            shared = {id(t): t for t in itertools.chain(base_unet.parameters(), base_unet.buffers())}
            unet = copy.deepcopy(base_unet, memo=shared)
        else:
            unet = base_unet
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
        self._last_layer = None

    def _unet(self) -> nn.Module:
        if self.unet is None:
            raise RuntimeError("LoRAScoreModel has no UNet: build it with unet= or prior=")
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

    def adapted_layers_in_call_order(self) -> list[str]:
        """Names of the LoRA-adapted layers in the order one forward pass runs them.

        Module registration order is not data-flow order in diffusers' UNet2DConditionModel: its
        ``mid_block`` is registered after ``up_blocks`` but runs before them. So the order is read
        off a forward pass (hooks on each adapted layer) on a minimal input: latents of side
        2^(#blocks - 1), one token, t = 0.
        """
        unet = self._unet()
        adapted = sorted({n.split(".lora_")[0] for n in self.trainable_parameters() if ".lora_" in n})
        prefix = "unet."
        modules = {name: unet.get_submodule(name[len(prefix):]) for name in adapted}
        order: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name) if name not in order
                                             else None) for name, m in modules.items()]
        cfg = unet.config
        side = 2 ** (len(cfg.block_out_channels) - 1)
        p = next(unet.parameters())
        x = torch.zeros(1, int(cfg.in_channels), side, side, device=p.device)
        cond = torch.zeros(1, 1, int(cfg.cross_attention_dim), device=p.device)
        try:
            with torch.no_grad():
                self.model_output(x, torch.zeros(1, dtype=torch.long, device=p.device), cond, None)
        finally:
            for h in hooks:
                h.remove()
        return order

    def last_layer_names(self) -> list[str]:
        """The LoRA factors of the adapted layer nearest the output in data-flow order: the last
        adapted layer a forward pass runs (for SD's UNet, the last up block's last cross-attention
        output projection, not a mid-block layer as module order would give)."""
        if self._last_layer is None:
            order = self.adapted_layers_in_call_order()
            if not order:
                return []
            last = order[-1]
            self._last_layer = [n for n in self.trainable_parameters() if n.startswith(last + ".lora_")]
        return list(self._last_layer)

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
