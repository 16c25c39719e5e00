"""Per-prompt instant-NGP: one hash grid and one pair of MLP heads per training prompt.

This is the non-amortized baseline (DreamFusion/Magic3D-style optimisation of one field per
prompt), batched so that B prompts still train in one pass: the P hash grids are instances
of one HashGridEncoding and the P networks are stacked parameters [P, out, in] gathered by
prompt id. It cannot represent prompts it was not trained on.

Memory grows with the number of prompts: at the paper's encoding (16 levels x 2 features,
2^19 rows) one prompt holds ~12.6M table parameters, so 415 prompts need ~100 GB to train.
The constructor estimates it first (:func:`training_bytes`) and refuses with the numbers
instead of dying in an allocation or in the OOM killer (issue 15).

``num_particles`` = n > 1 gives every prompt n independent fields (ProlificDreamer §3.2: VSD's
particles {theta^(i)}, sharing the guidance's one score model): instance ``prompt * n + i`` is particle
i of the prompt, so n = 1 is exactly the previous generator (same shapes, same initial draw). Each
training step renders ONE particle per prompt, drawn uniformly from the step-keyed RNG, as
ProlificDreamer's Algorithm 1 does ("randomly sample theta ~ {theta^(i)}", App. E): a step costs what an
n = 1 step costs, and a resumed run draws the same particles. ``z`` carries the particle ids [B];
without it (evaluation, export) the field is particle ``eval_particle`` (generators/particles.py).

``sparse_updates`` makes a step O(batch) instead of O(prompts) (issue 15): the batch's unique
instances are gathered into a working set (:func:`amortized3d.row_sparse.gather_rows`), the field is
built on it, and every parameter receives a row-sparse gradient over those instances only, which
the optimizer built for these groups (``row_sparse``: :class:`amortized3d.row_sparse.LazyAdam`)
applies with a step count per instance; the divergence guard backs up only those rows. Off: the
dense gradient over every instance and torch's Adam, whose step moves prompts outside the batch
(their momentum, beta1 > 0) and bias-corrects every prompt with the global step count.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from amortized3d.generators.base import Generator
from amortized3d.generators.encodings import HashGridEncoding, level_layout, level_resolutions
from amortized3d.generators.fields import HashGridField, SdfBias
from amortized3d.generators.mlp import Activation, kaiming_weights, mlp_shapes, num_weights
from amortized3d.row_sparse import gather_rows

# Bytes a float32 trained parameter costs during training: the weight, its gradient, Adam's two
# moments and the divergence guard's pre-step copy (system._checked_step): 5 x 4 bytes.
TRAINING_BYTES_PER_PARAMETER = 20
# With sparse_updates only the weight and the two moments are [P, ...]: the gradient and the rollback copy
# cover the batch's rows (plus an int64 step count per instance, counted in training_bytes).
SPARSE_TRAINING_BYTES_PER_PARAMETER = 12
_ENCODING_DEFAULTS = {"n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19, "base_resolution": 16,
                      "per_level_scale": 1.447}


class IngpTooLargeError(MemoryError):
    """The per-prompt iNGP would not fit in memory (raised before allocating anything)."""


def parameters_per_prompt(encoding: Mapping[str, Any] | None = None, mlp_hidden: int = 64) -> int:
    """Trained parameters of one prompt's field: its hash-grid rows x features + both MLP heads."""
    enc = {**_ENCODING_DEFAULTS, **{k: v for k, v in dict(encoding or {}).items() if k in _ENCODING_DEFAULTS}}
    res = level_resolutions(int(enc["n_levels"]), int(enc["base_resolution"]), float(enc["per_level_scale"]))
    _, rows, _ = level_layout(res, 2 ** int(enc["log2_hashmap_size"]))
    feat = int(enc["n_levels"]) * int(enc["n_features_per_level"])
    heads = num_weights(mlp_shapes(feat, mlp_hidden, 1)) + num_weights(mlp_shapes(feat, mlp_hidden, 3))
    return sum(rows) * int(enc["n_features_per_level"]) + heads


def bytes_per_parameter(sparse_updates: bool = False) -> int:
    return SPARSE_TRAINING_BYTES_PER_PARAMETER if sparse_updates else TRAINING_BYTES_PER_PARAMETER


def training_bytes(num_prompts: int, encoding: Mapping[str, Any] | None = None, mlp_hidden: int = 64,
                   sparse_updates: bool = False) -> int:
    """Memory to train ``num_prompts`` per-prompt fields: parameters x bytes_per_parameter (sparse: + the
    per-instance step counts of the 1 + 2 x 2 parameter tensors)."""
    steps = num_prompts * 5 * 8 if sparse_updates else 0
    return num_prompts * parameters_per_prompt(encoding, mlp_hidden) * bytes_per_parameter(sparse_updates) + steps


def available_bytes() -> tuple[int, str]:
    """(bytes, where): the smaller of this host's MemAvailable and, with CUDA, the current device's free memory."""
    found: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        found.append((int(info["MemAvailable"]) * 1024, "host MemAvailable"))
    except (OSError, KeyError, ValueError, IndexError):
        found.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host physical memory"))
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        found.append((int(free), f"free memory of cuda:{torch.cuda.current_device()}"))
    return min(found)


def check_fits(num_prompts: int, encoding: Mapping[str, Any] | None, mlp_hidden: int,
               available: tuple[int, str] | None = None, sparse_updates: bool = False) -> int:
    """Raise :class:`IngpTooLargeError` when training would need more memory than is available."""
    need = training_bytes(num_prompts, encoding, mlp_hidden, sparse_updates)
    have, where = available or available_bytes()
    if need > have:
        per = parameters_per_prompt(encoding, mlp_hidden)
        per_bytes = bytes_per_parameter(sparse_updates)
        fit = max(0, have // (per * per_bytes))
        log2 = int(dict(encoding or {}).get("log2_hashmap_size", _ENCODING_DEFAULTS["log2_hashmap_size"]))
        what = ("weight, Adam moments" if sparse_updates else "weight, gradient, Adam moments, rollback copy")
        hint = "" if sparse_updates else ", generator.sparse_updates=true (12 instead of 20 bytes per parameter)"
        raise IngpTooLargeError(
            f"per-prompt iNGP for {num_prompts} fields (prompts x particles) needs {need / 2**30:.1f} GiB to train "
            f"({per:,} parameters per prompt x {per_bytes} bytes: {what}) but only {have / 2**30:.1f} GiB are "
            f"available ({where}); at most {fit} prompts fit. Train one prompt per run (experiment/*_per_prompt), "
            f"lower generator.encoding.log2_hashmap_size (now {log2}; each step down roughly halves the table)"
            f"{hint}, or use an amortized generator (hyper_ingp, conv3d). generator.check_memory=false skips "
            "this check.")
    return need


class IngpGenerator(Generator):
    """``forward(text_emb, prompt_ids) -> HashGridField``; uses prompt_ids, ignores text."""

    field_kind = "sdf"
    supports_unseen_prompts = False

    def __init__(
        self,
        num_prompts: int,
        encoding: Mapping[str, Any] | None = None,
        mlp_hidden: int = 64,
        activation: Activation = "relu",
        sdf_bias: SdfBias = "sphere",
        sdf_bias_radius: float = 0.5,
        fused_mlp: bool = False,
        check_memory: bool = True,
        num_particles: int = 1,
        sparse_updates: bool = False,
    ) -> None:
        super().__init__()
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        self.num_particles = int(num_particles)
        self.eval_particle = 0  # the particle forward() returns without z (not state: set per call)
        instances = num_prompts * self.num_particles
        if check_memory:  # before any allocation: a refusal with numbers, not an OOM kill
            check_fits(instances, encoding, mlp_hidden, sparse_updates=bool(sparse_updates))
        enc_kwargs = dict(encoding or {})
        enc_kwargs["num_instances"] = instances  # one table per prompt and particle, whatever the config
        self.num_prompts = num_prompts
        self.encoding = HashGridEncoding(**enc_kwargs)
        # O(batch) steps: working set + row-sparse gradients + LazyAdam (module docstring).
        self.sparse_updates = bool(sparse_updates)
        if self.sparse_updates and self.encoding.implementation != "torch":
            raise ValueError("generator.sparse_updates=true needs the torch hash grid (tcnn holds one table of its "
                             "own): set generator.encoding.implementation=torch, or sparse_updates=false (with "
                             "one prompt per run there is nothing to make sparse)")
        feat = self.encoding.output_dim
        self.sdf_layers = nn.ParameterList(
            [nn.Parameter(w) for w in kaiming_weights(mlp_shapes(feat, mlp_hidden, 1), instances)])
        self.rgb_layers = nn.ParameterList(
            [nn.Parameter(w) for w in kaiming_weights(mlp_shapes(feat, mlp_hidden, 3), instances)])
        self.activation: Activation = activation
        self.sdf_bias: SdfBias = sdf_bias
        self.sdf_bias_radius = sdf_bias_radius
        # True: both heads as one chunked network (fields.HashGridField; 2-3x faster MLPs on CPU,
        # equal to the two-head path in float64, also over whole training runs: tests/test_mlp.py).
        # False here; the configs turn it on where quality over seeds was measured
        # (configs/prior_generator/*_hyper_ingp.yaml). In fp32 either path's run is one draw of
        # a process chaotic in rounding (docs/results.md, session 8).
        self.fused_mlp = bool(fused_mlp)

    def sample_latent(self, batch: int, rng: torch.Generator | None = None) -> Tensor | None:
        """Which particle each of ``batch`` prompts renders this step (uniform, Alg. 1 line 3); None for
        n = 1, where nothing is drawn, so one-particle runs consume the RNG exactly as before."""
        if self.num_particles == 1:
            return None
        return torch.randint(self.num_particles, (batch,), generator=rng)

    def forward(self, text_emb: Tensor | None, prompt_ids: Tensor, z: Tensor | None = None) -> HashGridField:
        ids = prompt_ids.long()
        if ids.dim() != 1:
            raise ValueError(f"prompt_ids must be [B], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_prompts):
            raise IndexError(f"prompt ids must lie in [0, {self.num_prompts}); per-prompt iNGP "
                             "cannot represent unseen prompts")
        particle = (z.to(ids.device).long().reshape(-1) if z is not None
                    else torch.full_like(ids, int(self.eval_particle)))
        if particle.shape != ids.shape or (particle.numel() and (int(particle.min()) < 0
                                                                or int(particle.max()) >= self.num_particles)):
            raise IndexError(f"particle ids {particle.tolist()} for prompts {ids.tolist()}: need one per prompt in "
                             f"[0, {self.num_particles})")
        ids = ids * self.num_particles + particle  # the instance of (prompt, particle)
        table = None
        sdf_layers, rgb_layers = list(self.sdf_layers), list(self.rgb_layers)
        if self.sparse_updates:  # the batch's unique instances as a working set; ids index into it
            instances, ids = torch.unique(ids, sorted=True, return_inverse=True)
            table = gather_rows(self.encoding.table, instances)
            sdf_layers = [gather_rows(w, instances) for w in sdf_layers]
            rgb_layers = [gather_rows(w, instances) for w in rgb_layers]
        return HashGridField(
            self.encoding, ids,
            sdf_weights=[w[ids] for w in sdf_layers],  # duplicates: their gradients sum, as w[ids] does densely
            rgb_weights=[w[ids] for w in rgb_layers],
            activation=self.activation, sdf_bias=self.sdf_bias,
            sdf_bias_radius=self.sdf_bias_radius, fused_mlp=self.fused_mlp, table=table)

    def parameter_groups(self) -> list[dict]:
        # row_sparse: these groups' gradients are row-sparse, so build_optimizer uses LazyAdam for them.
        sparse = {"row_sparse": True} if self.sparse_updates else {}
        return [
            {"name": "encoding", "params": list(self.encoding.parameters()), **sparse},
            {"name": "network", "params": [*self.sdf_layers, *self.rgb_layers], **sparse},
        ]
