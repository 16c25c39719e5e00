"""The model: what a trained checkpoint is once training is over.

Text table + text encoder + generator + renderer + evaluation background, and the queries that
evaluation, export and validation make of them (``embed``, ``render``, ``renderable``). It holds
no guidance, no prior and no optimiser state: :class:`amortized3d.system.AmortizedSystem` wraps
it with those for training (as nerfstudio's Model is separate from its Trainer).

Checkpoints keep the two apart: the model's state is under ``model.*``, the guidance's under
``guidance.*``. Checkpoints written before the split keep the model's parts at the top level
(``generator.*``, ``renderer.*``, ...); :func:`upgrade_state_dict` maps them at load time.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from amortized3d.cameras import CameraBatch
from amortized3d.generators.base import Generator
from amortized3d.rendering import Background, RenderOutput, SolidBackground, VolumeRenderer
from amortized3d.rendering.baked import BakedField
from amortized3d.text.base import TextEncoder

STATE_PREFIX = "model."
# The model's submodules as the pre-split checkpoints named them (top-level keys of the system).
LEGACY_PARTS = ("generator.", "renderer.", "eval_background.", "text_encoder.")


class AmortizedModel(nn.Module):
    """Renders any prompt the generator can condition on, bound to its training prompts in order.

    ``train_prompts[i]`` is conditioned on ``text_table[i]`` and, for per-prompt generators, owns
    field ``i``: the list is the model's identity, stored in checkpoints and bound again on load.
    """

    def __init__(self, generator: Generator, renderer: VolumeRenderer, text_encoder: TextEncoder,
                 train_prompts: Sequence[str], text_table: Tensor, eval_background: Background | None = None):
        super().__init__()
        self.generator, self.renderer = generator, renderer
        self.text_encoder = text_encoder
        self.train_prompts = list(train_prompts)
        self._train_index = {p: i for i, p in enumerate(self.train_prompts)}
        # Not a buffer (issue 15): a buffer is copied by .to(), broadcast by DDP and, as fp32, was a private
        # 391 MB (100k) / 3.9 GB (1M) per rank. The table stays as given, normally the text cache's fp16
        # memory-mapped file, shared by every rank of a node through the page cache (rebuilt from the
        # cache, never checkpointed); rows are gathered on the CPU and only a batch's rows move (text_rows).
        self.text_table = text_table
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)  # follows .to(device)
        self.eval_background = eval_background or SolidBackground()

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def text_rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the text table as float32 on the model's device (an O(batch) copy)."""
        return self.text_table[ids.cpu()].to(self.device, torch.float32)

    def embed(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Text embeddings and prompt ids (train-corpus index, -1 when unseen) for any prompts."""
        ids = torch.tensor([self._train_index.get(p, -1) for p in prompts], device=self.device)
        if (ids >= 0).all():
            return self.text_rows(ids), ids
        if not self.generator.supports_unseen_prompts:
            unseen = [p for p, i in zip(prompts, ids.tolist()) if i < 0]
            raise ValueError(f"{type(self.generator).__name__} is a per-prompt generator and cannot render prompts "
                             f"it was not trained on: {unseen}")
        emb = self.text_encoder.encode(list(prompts)).to(self.device, torch.float32)
        return emb, ids.clamp(min=0)

    def render(self, prompts: Sequence[str], cameras: CameraBatch, *, background: Background | None = None,
               compute_normals: bool = False, regularizers: Sequence[str] = (),
               rng: torch.Generator | None = None, bake: tuple[int, float] | None = None,
               renderer: VolumeRenderer | None = None) -> RenderOutput:
        """Render ``len(cameras) // len(prompts)`` views of each prompt (prompt-major cameras).

        ``bake=(resolution, bound)`` samples each field once on a voxel grid first (evaluation of
        many views; see :class:`amortized3d.rendering.baked.BakedField`); ``renderer`` replaces the
        training renderer (e.g. an evaluation sample budget).
        """
        text_emb, ids = self.embed(prompts)
        field = self.generator(text_emb, ids)
        renderer = renderer or self.renderer
        if bake is not None:
            field = BakedField(field, resolution=bake[0], bound=bake[1], device=self.device,
                               sphere=renderer.lookup_sphere(compute_normals))
        return renderer(field, cameras.to(self.device), background=background or self.eval_background,
                        compute_normals=compute_normals, regularizers=regularizers, rng=rng)

    def renderable(self, prompts: Sequence[str]) -> list[str]:
        """The prompts this generator can render (per-prompt generators: only their training prompts)."""
        if self.generator.supports_unseen_prompts:
            return list(prompts)
        return [p for p in prompts if p in self._train_index]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator["AmortizedModel"]:
        """Eval mode (deterministic ray samples, the evaluation background) for the block; each
        submodule's own mode is restored afterwards, so a validation render mid-training leaves
        training exactly as it was."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            yield self
        finally:
            for module, training in modes:
                module.train(training)


def upgrade_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A system state dict in the current layout: pre-split keys ``generator.*`` (etc.) become
    ``model.generator.*``; every other key is kept as it is."""
    return {(STATE_PREFIX + k if k.startswith(LEGACY_PARTS) else k): v for k, v in state.items()}


def model_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's own entries of a system state dict (old or new layout), without the prefix."""
    return {k[len(STATE_PREFIX):]: v for k, v in upgrade_state_dict(state).items() if k.startswith(STATE_PREFIX)}
