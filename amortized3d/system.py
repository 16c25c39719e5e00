"""The training system: the model plus a guidance and the (ordered) optimizer steps.

The model (:class:`amortized3d.model.AmortizedModel`: text table, generator, renderer) is what
evaluation and export load; this LightningModule adds what only training needs: the guidance,
the training cameras and background, the loss weights and the optimisers.

Manual optimisation, because score-distillation objectives need a specific order between
the generator step and their own score-model step (VSD: after, L-VSD: before, threestudio:
joint). That order is executed by ``amortized3d.update_order`` (from ``guidance.auxiliary``);
this module supplies the Lightning pieces (backward, rank averaging, the step counters).
Lightning's ``global_step`` counts generator updates; ``batch_index`` counts training steps
(including ones skipped for non-finite gradients) and keys the data and RNG streams, so a
resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor

from amortized3d.cameras import CameraBatch, CameraRanges, orbit_cameras, sample_cameras
from amortized3d.config_version import CONFIG_VERSION
from amortized3d.data import step_rng
from amortized3d.divergence import DivergenceGuard, last_good_checkpoint, uncount_lightning_step
from amortized3d.evaluation.shard import gather_results, shard_indices
from amortized3d.generators.base import Generator
from amortized3d.guidance.base import Guidance, GuidanceInput
from amortized3d.model import AmortizedModel, upgrade_state_dict
from amortized3d.optim import build_optimizer
from amortized3d.rendering import Background, RenderOutput, SolidBackground, VolumeRenderer
from amortized3d.row_sparse import has_row_steps
from amortized3d.run_guard import DivergenceError, ResumeMismatchError
from amortized3d.schedules import Scheduled
from amortized3d.text.base import TextEncoder
from amortized3d.update_order import StepParts, UpdateOrderExecutor, build_auxiliary_optimizer

REGULARIZERS = ("sparsity", "opaque", "eikonal")
FROZEN_PREFIX = "guidance.prior."  # the frozen prior is rebuilt from config, never checkpointed


class AmortizedSystem(L.LightningModule):
    def __init__(self, model: AmortizedModel, guidance: Guidance, optimizer: dict, loss_weights: dict[str, Any],
                 views_per_prompt: int = 1, resolution: int = 64, camera_ranges: CameraRanges = CameraRanges(),
                 train_background: Background | None = None, seed: int = 0, val_views: int = 4,
                 val_resolution: int | None = None, config: dict | None = None, max_consecutive_nonfinite: int = 5):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.guidance = model, guidance
        self.optimizer_config = dict(optimizer)
        # Multiplier of every group's base lr as a function of the step (a number or [[step, x], ...]).
        self.lr_scale = Scheduled.parse(self.optimizer_config.pop("lr_scale", 1.0))
        self.loss_weights = {k: Scheduled.parse(v) for k, v in loss_weights.items()}
        self.views_per_prompt, self.resolution, self.camera_ranges = views_per_prompt, resolution, camera_ranges
        self.train_background = train_background or SolidBackground()
        self.seed, self.val_views = seed, val_views
        self.val_resolution = val_resolution or resolution
        self.batch_index = 0  # training steps taken, skipped ones included
        # Divergence guard: skipped steps are counted (nonfinite_steps); this many generator steps in
        # a row skipped (non-finite gradients, or an update that would have made the weights
        # non-finite) stop the run (DivergenceError).
        self.guard = DivergenceGuard(max_consecutive=int(max_consecutive_nonfinite), reduce_min=self._reduce_min)
        self._configured_groups: list[dict] = []
        self.resume_record: dict | None = None  # set by train(): what a resume changed (applied, recorded)
        self._resume_history: list[dict] = []
        self.auxiliary_optimizer: torch.optim.Optimizer | None = None
        self._render_memo: dict = {}  # this step's GuidanceInput.memo (one VAE encode per step)
        # The guidance's frozen pretrained weights outside the prior (e.g. a LoRA's base UNet): never checkpointed.
        frozen = guidance.auxiliary.frozen_state_keys if guidance.auxiliary is not None else ()
        self._frozen_keys = {f"guidance.{k}" for k in frozen}
        self.save_hyperparameters({"config": config or {}})
        self.val_images: list[Tensor] = []

    # --- the model's parts and queries (read-only: the model owns them) -------------------------
    @property
    def generator(self) -> Generator:
        return self.model.generator

    @property
    def renderer(self) -> VolumeRenderer:
        return self.model.renderer

    @property
    def text_encoder(self) -> TextEncoder:
        return self.model.text_encoder

    @property
    def text_table(self) -> Tensor:
        return self.model.text_table

    @property
    def train_prompts(self) -> list[str]:
        return self.model.train_prompts

    def embed(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.model.embed(prompts)

    def render(self, prompts: Sequence[str], cameras: CameraBatch, **kwargs) -> RenderOutput:
        return self.model.render(prompts, cameras, **kwargs)

    def renderable(self, prompts: Sequence[str]) -> list[str]:
        return self.model.renderable(prompts)

    # --- optimisation ---------------------------------------------------------------------------
    @property
    def nonfinite_steps(self) -> int:
        """Steps whose gradients or update were not finite (skipped, counted)."""
        return self.guard.nonfinite_steps

    @nonfinite_steps.setter
    def nonfinite_steps(self, value: int) -> None:
        self.guard.nonfinite_steps = int(value)

    @property
    def consecutive_nonfinite(self) -> int:
        return self.guard.consecutive

    @property
    def max_consecutive_nonfinite(self) -> int:
        return self.guard.max_consecutive

    def _reduce_min(self, flag: Tensor) -> Tensor:
        """A 0/1 flag reduced over ranks (min): every rank takes the same skip decision."""
        return self.trainer.strategy.reduce(flag, reduce_op="min") if self.trainer.world_size > 1 else flag

    def setup(self, stage: str) -> None:
        # The auxiliary (score) model is updated in its own backward passes, in an order DDP's
        # reducer does not expect; keep it out of the reducer and average its gradients ourselves.
        aux = self.guidance.auxiliary
        ids = {id(p) for p in aux.trainable_parameters().values()} if aux is not None else set()
        self._ddp_params_and_buffers_to_ignore = [n for n, p in self.named_parameters() if id(p) in ids]

    def _average_auxiliary_gradients(self) -> None:
        if self.trainer.world_size == 1:
            return
        grads = [p.grad for g in self.auxiliary_optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.trainer.world_size
            for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))

    def configure_optimizers(self):
        # The auxiliary optimizer is owned here, not by Lightning: global_step counts generator updates only.
        self.auxiliary_optimizer = build_auxiliary_optimizer(self.guidance)
        if self.auxiliary_optimizer is not None:
            self._aux_configured_groups = [{k: v for k, v in g.items() if k != "params"}
                                           for g in self.auxiliary_optimizer.param_groups]
        optimizer = build_optimizer(self.generator.parameter_groups(), self.optimizer_config)
        # The settings of this run's config: re-applied after a resume restores the old ones (on_train_start).
        self._configured_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return optimizer

    def _active_regularizers(self) -> list[str]:
        return [r for r in REGULARIZERS if r in self.loss_weights and self.loss_weights[r](self.batch_index) != 0]

    def _reduce(self, losses: Mapping[str, Tensor], item_weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted per-item losses -> scalar; padding items (weight 0) contribute nothing."""
        total, logs = 0.0, {}
        for name, per_item in losses.items():
            w = item_weights.repeat_interleave(per_item.shape[0] // item_weights.shape[0])
            value = (per_item * w).sum() / w.numel()
            lam = self.loss_weights[name](self.batch_index) if name in self.loss_weights else 1.0
            total = total + lam * value
            logs[f"loss/{name}"] = value.detach()
        return total, logs

    def _guidance_input(self, out: RenderOutput, cameras: CameraBatch, prompts: list[str], text_emb: Tensor,
                        stream: str, detach: bool = False) -> GuidanceInput:
        extras = {"opacity": out.opacity, "normal": out.normal}
        if detach:
            extras = {k: (v.detach() if v is not None else None) for k, v in extras.items()}
        return GuidanceInput(rgb=out.rgb.detach() if detach else out.rgb, cameras=cameras, prompts=prompts,
                             step=self.batch_index, text_emb=text_emb, extras=extras,
                             rng=step_rng(self.seed, self.batch_index, self.global_rank, stream),
                             memo=self._render_memo)

    def _auxiliary_backward(self, loss: Tensor) -> None:
        """Backward of the guidance's own model's loss (a separate hook: benchmarks time it apart)."""
        self.manual_backward(loss)

    def _apply_lr_scale(self, optimizer) -> None:
        scale = self.lr_scale(self.batch_index)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * scale

    def _guard_divergence(self, stepped: bool, opt, out: RenderOutput, losses: Mapping[str, Tensor]) -> None:
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(v).all())] if not stepped else []
        renders_finite = bool(torch.isfinite(out.rgb).all()) if not stepped else True
        if not self.guard.record(stepped, self.batch_index, self.global_step, renders_finite, bad):
            return
        streak = self.guard.streak
        names = {id(p): n for n, p in self.named_parameters()}
        raise DivergenceError(
            f"training diverged: {self.guard.consecutive} consecutive non-finite steps "
            f"(steps {streak['start']}-{self.batch_index}, limit system.max_consecutive_nonfinite="
            f"{self.guard.max_consecutive}); cause: {self.guard.diagnose(opt, self.auxiliary_optimizer, names)}; "
            f"last good checkpoint: {self._last_good_checkpoint()}")

    def _last_good_checkpoint(self) -> str:
        """The newest checkpoint written before the non-finite streak began."""
        cb = self.trainer.checkpoint_callback
        return last_good_checkpoint(cb.dirpath if cb is not None else None,
                                    self.guard.streak.get("global_step", self.global_step),
                                    getattr(self.trainer, "ckpt_path", None),
                                    self.guard.streak.get("start", self.batch_index))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if int(batch["step"]) != self.batch_index:
            raise RuntimeError(f"data stream at step {int(batch['step'])} but the system is at {self.batch_index}")
        opt = self.optimizers()
        ids, weights = batch["prompt_ids"].to(self.device), batch["weights"].to(self.device)
        V = self.views_per_prompt
        prompts = [self.train_prompts[i] for i in ids.tolist() for _ in range(V)]
        cameras = sample_cameras(len(prompts), self.resolution, self.camera_ranges,
                                 rng=step_rng(self.seed, self.batch_index, self.global_rank, "cameras"))
        cameras = cameras.to(self.device)
        text_emb = self.model.text_rows(ids)
        z = self.generator.sample_latent(  # fresh per step, keyed by it (exact resume); None if no latent
            len(ids), step_rng(self.seed, self.batch_index, self.global_rank, "latent"))
        field = self.generator(text_emb, ids, z=z)  # once per step: shared by all views and ray samples
        out = self.renderer(field, cameras, background=self.train_background, regularizers=self._active_regularizers(),
                            compute_normals=self.guidance.needs_normals,
                            rng=step_rng(self.seed, self.batch_index, self.global_rank, "render"))
        text_emb = text_emb.repeat_interleave(V, dim=0)
        self._render_memo = {"rgb": out.rgb}  # every guidance input of this step shares one encode
        self.guard.device = self.device

        def generator_step() -> None:
            self._apply_lr_scale(opt)
            opt.step()

        parts = StepParts(
            inputs=lambda stream, detach: self._guidance_input(out, cameras, prompts, text_emb, stream, detach),
            reduce=lambda losses: self._reduce(losses, weights),
            backward=lambda loss: self.manual_backward(loss),
            auxiliary_backward=lambda loss: self._auxiliary_backward(loss),
            generator_step=generator_step,
            items=out.rgb.shape[0] * self.trainer.world_size,  # the gradient is averaged over ranks
            average_auxiliary_gradients=self._average_auxiliary_gradients,
            on_generator_rollback=lambda: uncount_lightning_step(self.trainer),  # not an update
            on_generator_step=lambda stepped, losses: self._guard_divergence(stepped, opt, out, losses),
            extra_losses=out.regularizers)
        result = UpdateOrderExecutor(self.guidance, opt, self.auxiliary_optimizer, self.guard).step(parts)
        self.batch_index += 1
        self._render_memo = {}  # release the step's renders and latents
        logs = {**result.logs, **{f"guidance/{k}": v for k, v in result.output.logs.items()}}
        logs["train/loss"] = result.loss
        logs["train/nonfinite_steps"] = torch.tensor(float(self.nonfinite_steps))
        logs["train/opacity"] = out.opacity.detach().mean()
        self.log_dict(logs, prog_bar=False, batch_size=len(prompts))
        self.log("loss", result.loss, prog_bar=True, logger=False, batch_size=len(prompts))
        return result.loss

    # --- validation -----------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Each rank renders its shard of the (bounded) val prompts; rank 0 assembles the grid."""
        prompts = self.renderable(self.trainer.datamodule.val_prompts)
        if not prompts:
            return
        mine = shard_indices(len(prompts), self.trainer.world_size, self.global_rank)
        cams = orbit_cameras(self.val_views, self.val_resolution)
        local: dict[int, tuple[Tensor, float]] = {}
        with torch.no_grad():
            if mine:
                out = self.render([prompts[i] for i in mine], CameraBatch.cat([cams] * len(mine)))
                for k, i in enumerate(mine):
                    views = slice(k * self.val_views, (k + 1) * self.val_views)
                    local[i] = (out.rgb[views].cpu(), float(out.opacity[views].mean()))
        rows = gather_results(local, len(prompts))  # every prompt exactly once, in order
        rgb = torch.cat([r for r, _ in rows]).to(self.device)
        self.val_images = [_grid(rgb, rows=len(prompts), cols=self.val_views)]
        self.log("val/opacity", sum(o for _, o in rows) / len(rows), batch_size=len(prompts) * self.val_views)

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen prior (e.g. Stable Diffusion, GBs) is rebuilt from config, never checkpointed.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not self._is_frozen(k)}
        checkpoint["amortized3d"] = {"config_version": CONFIG_VERSION,  # the layout of hyper_parameters.config
                                     "batch_index": self.batch_index, "nonfinite_steps": self.nonfinite_steps,
                                     "train_prompts": self.train_prompts,
                                     "text_encoder": getattr(self.text_encoder, "identity", None),
                                     "auxiliary_optimizer": (self.auxiliary_optimizer.state_dict()
                                                             if self.auxiliary_optimizer is not None else None),
                                     # what each resume changed (applied): plain data, [{step, changed, forced}]
                                     "resumes": list(self._resume_history),
                                     "consecutive_nonfinite": self.consecutive_nonfinite,
                                     "wandb_id": self._wandb_id()}

    def _wandb_id(self) -> str | None:
        trainer = self._trainer
        for logger in (trainer.loggers if trainer is not None else []):
            if type(logger).__name__ == "WandbLogger":
                try:
                    return str(logger.version) if logger.version is not None else None
                except Exception:  # noqa: BLE001 - an unusable logger never breaks a save
                    return None
        return None

    def _is_frozen(self, key: str) -> bool:
        return key.startswith(FROZEN_PREFIX) or key in self._frozen_keys

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning loads checkpoint["state_dict"] right after this hook: a pre-split checkpoint
        # (generator.*, renderer.* at the top level) is mapped to model.* here, so it resumes.
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
        own = self.state_dict()
        checkpoint["state_dict"].update({k: v for k, v in own.items() if self._is_frozen(k)})
        self._check_optimizer_kind(checkpoint)
        state = checkpoint.get("amortized3d", {})
        self.batch_index = int(state.get("batch_index", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        # Lightning restores the model before it builds the dataloaders: start the stream here.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "start_step"):
            datamodule.start_step = self.batch_index
        self._pending_aux_state = state.get("auxiliary_optimizer")
        self._resume_history = list(state.get("resumes", []))
        self._resumed_from_step = int(checkpoint.get("global_step", 0))

    def _check_optimizer_kind(self, checkpoint: dict) -> None:
        """A LazyAdam state (per-row step counts, generator.sparse_updates=true) cannot continue under the
        dense Adam: refused. The other way LazyAdam.load_state_dict converts (every row counts the steps)."""
        states = checkpoint.get("optimizer_states") or []
        row_sparse = any(g.get("row_sparse") for g in self.generator.parameter_groups())
        if states and has_row_steps(states[0]) and not row_sparse:
            raise ResumeMismatchError(
                "the checkpoint's generator optimizer is the lazy Adam of generator.sparse_updates=true (a step "
                "count per prompt) and this run's is the dense Adam: its state has no dense equivalent; resume "
                "with generator.sparse_updates=true")

    def on_fit_start(self) -> None:
        pending = getattr(self, "_pending_aux_state", None)
        if pending is not None and self.auxiliary_optimizer is not None:
            self.auxiliary_optimizer.load_state_dict(pending)
            self._pending_aux_state = None
            _apply_groups(self.auxiliary_optimizer, self._aux_configured_groups)

    def on_train_start(self) -> None:
        """After a resume (Lightning restored the optimizer state, with the old run's lr, betas, ...),
        this run's configured optimizer settings are applied for real and the resume is recorded."""
        if not hasattr(self, "_resumed_from_step"):
            return
        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        applied = _apply_groups(opt, self._configured_groups)
        record = dict(self.resume_record or {})
        record.setdefault("changed", {})
        record["step"] = self._resumed_from_step
        if applied:
            record["optimizer_groups"] = applied
        self._resume_history.append(record)
        del self._resumed_from_step


def _apply_groups(optimizer: torch.optim.Optimizer, configured: list[dict]) -> dict:
    """Set each param group's hyper-parameters (lr, betas, ...) to the configured ones; returns
    ``{"<group>.<key>": [restored, configured]}`` for those that differed."""
    changed = {}
    if len(configured) != len(optimizer.param_groups):
        return changed
    for i, (group, conf) in enumerate(zip(optimizer.param_groups, configured)):
        for key, value in conf.items():
            old = group.get("base_lr", group.get(key)) if key == "lr" else group.get(key)
            if old != value:
                changed[f"{conf.get('name', i)}.{key}"] = [_plain(old), _plain(value)]
            group[key] = value
        group["base_lr"] = conf.get("lr", group["lr"])  # the lr_scale multiplies this
    return changed


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _grid(rgb: Tensor, rows: int, cols: int) -> Tensor:
    """[rows*cols,3,H,W] -> one [3, rows*H, cols*W] image."""
    _, c, h, w = rgb.shape
    return rgb.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w).clamp(0, 1)
