"""A procedural ground-truth world of coloured primitives ("a red cube", "a blue torus", ...).

Why it exists: without internet there is no Stable Diffusion, so the CPU default prior is the
exact denoiser of reference renders of *this* world (see ``priors/analytic.py``). Because the
ground truth is known analytically, training quality is measurable (oracle metrics), and the
held-out shape-colour combinations test prompt amortization on unseen compositions.

Conventions: world z-up, every object centred at the origin inside a sphere of radius ~0.45
(the cameras orbit at distance 1-1.5). SDFs are exact (sphere, box, cylinder, cone, torus), so
their Lipschitz constant is 1 and sphere tracing / VolSDF density is well behaved.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Callable, ClassVar, NamedTuple, Sequence

import torch
from torch import Tensor

from amortized3d.generators.base import FieldKind

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus")
COLOURS: dict[str, tuple[float, float, float]] = {
    # Saturated and far from the white background, pairwise distinct in RGB.
    "red": (0.85, 0.10, 0.10),
    "green": (0.12, 0.70, 0.18),
    "blue": (0.12, 0.25, 0.88),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.15, 0.75),
    "orange": (0.97, 0.50, 0.05),
}
# Words tolerated by the prompt parser besides a colour and a shape: articles and the
# view-dependent prompting suffixes ("a red cube, front view").
_IGNORED_WORDS = frozenset({"a", "an", "the", "of", "front", "side", "back", "overhead", "view"})

BOUNDING_RADIUS = 0.45
_SPHERE_R = 0.38
_CUBE_HALF = 0.26  # half extent, rounding included
_CYL_R, _CYL_H = 0.28, 0.30  # radius, half height
_CONE_R, _CONE_H = 0.33, 0.30  # base radius, half height (base at z=-h, apex at z=+h)
_TORUS_R, _TORUS_r = 0.30, 0.12  # major, minor radius
_EPS = 1e-12  # keeps sqrt differentiable at 0 (value bias ~1e-6, irrelevant)


def _length(x: Tensor) -> Tensor:
    return torch.sqrt((x * x).sum(-1) + _EPS)


def _sdf_sphere(p: Tensor, rounding: float) -> Tensor:
    return _length(p) - _SPHERE_R


def _sdf_cube(p: Tensor, rounding: float) -> Tensor:
    # Exact rounded box (Quilez): box of half extent h - r, inflated by r.
    q = p.abs() - (_CUBE_HALF - rounding)
    outside = _length(q.clamp(min=0.0))
    inside = q.amax(-1).clamp(max=0.0)
    return outside + inside - rounding


def _sdf_cylinder(p: Tensor, rounding: float) -> Tensor:
    d = torch.stack([_length(p[..., :2]) - _CYL_R, p[..., 2].abs() - _CYL_H], dim=-1)
    return d.amax(-1).clamp(max=0.0) + _length(d.clamp(min=0.0))


def _sdf_cone(p: Tensor, rounding: float) -> Tensor:
    # Exact capped cone (Quilez sdCappedCone) with top radius 0, axis z, apex up.
    qx, qy = _length(p[..., :2]), p[..., 2]
    h, r1 = _CONE_H, _CONE_R
    k2x, k2y = -r1, 2.0 * h  # k2 = (r2 - r1, 2h), k1 = (r2, h) = (0, h)
    ca_x = qx - torch.minimum(qx, torch.where(qy < 0, torch.full_like(qx, r1), torch.zeros_like(qx)))
    ca_y = qy.abs() - h
    s = ((-qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y)
    s = s.clamp(0.0, 1.0)
    cb_x, cb_y = qx + k2x * s, qy - h + k2y * s
    sign = torch.where((cb_x < 0) & (ca_y < 0), -1.0, 1.0)
    d2 = torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y)
    return sign * torch.sqrt(d2 + _EPS)


def _sdf_torus(p: Tensor, rounding: float) -> Tensor:
    q = torch.stack([_length(p[..., :2]) - _TORUS_R, p[..., 2]], dim=-1)
    return _length(q) - _TORUS_r


_SDFS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "sphere": _sdf_sphere, "cube": _sdf_cube, "cylinder": _sdf_cylinder,
    "cone": _sdf_cone, "torus": _sdf_torus,
}


class PrimitiveObject(NamedTuple):
    shape: str
    colour: str


@dataclass
class PrimitivesField:
    """B ground-truth objects as one batched analytic field (``Field`` protocol, kind "sdf")."""

    shape_ids: Tensor  # [B] index into world.shapes
    albedo_table: Tensor  # [B,3]
    world: "PrimitivesWorld"
    kind: FieldKind = "sdf"

    @property
    def batch_size(self) -> int:
        return int(self.shape_ids.shape[0])

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points [B,M,3] -> (sdf [B,M], albedo [B,M,3]); object b is evaluated at points[b]."""
        b, m, _ = points.shape
        if b != self.batch_size:
            raise ValueError(f"points batch {b} != field batch {self.batch_size}")
        shape_ids = self.shape_ids.to(points.device)
        sdf = points.new_zeros(b, m)
        # One vectorised SDF evaluation per shape present (at most len(shapes) iterations).
        for s in torch.unique(shape_ids).tolist():
            sel = (shape_ids == s).nonzero(as_tuple=True)[0]
            vals = _SDFS[self.world.shapes[s]](points.index_select(0, sel), self.world.cube_rounding)
            sdf = sdf.index_copy(0, sel, vals.to(sdf.dtype))
        albedo = self.albedo_table.to(device=points.device, dtype=points.dtype)[:, None, :].expand(b, m, 3)
        return sdf, albedo


@dataclass(frozen=True)
class PrimitivesWorld:
    """All shape x colour combinations, with stable ids ``shape_index * len(colours) + colour_index``."""

    name: ClassVar[str] = "primitives"  # configs/world/<name>.yaml; names the reference cache
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    cube_rounding: float = 0.03
    bounding_radius: float = BOUNDING_RADIUS
    # The sphere this world is rendered in (references, oracle, the analytic prior's scene bound). Not in
    # the repr, which keys the reference cache: the cache key records it as the reference renderer's bound.
    bound: float = dataclass_field(default=1.0, repr=False)

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in _SDFS] + [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown shapes/colours {unknown}; known: {sorted(_SDFS)} / {sorted(COLOURS)}")
        if not self.bound > self.bounding_radius:
            raise ValueError(f"world bound {self.bound} must exceed the objects' bounding radius "
                             f"{self.bounding_radius}")
        # Hydra passes lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "colours", tuple(self.colours))

    @property
    def objects(self) -> list[PrimitiveObject]:
        return [PrimitiveObject(s, c) for s in self.shapes for c in self.colours]

    @property
    def num_objects(self) -> int:
        return len(self.shapes) * len(self.colours)

    def object_id(self, shape: str, colour: str) -> int:
        return self.shapes.index(shape) * len(self.colours) + self.colours.index(colour)

    def prompt(self, object_id: int) -> str:
        shape, colour = self.objects[int(object_id)]
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {shape}"

    def prompts(self) -> list[str]:
        return [self.prompt(i) for i in range(self.num_objects)]

    def object_for_prompt(self, prompt: str) -> int:
        """Parse "a red cube" (articles and view suffixes allowed) into an object id."""
        words = [w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in _IGNORED_WORDS]
        shapes = [w for w in words if w in self.shapes]
        colours = [w for w in words if w in self.colours]
        unknown = [w for w in words if w not in self.shapes and w not in self.colours]
        if unknown or len(shapes) != 1 or len(colours) != 1:
            raise ValueError(
                f"cannot parse prompt {prompt!r} as '<colour> <shape>' (unknown words {unknown}); "
                f"valid shapes: {list(self.shapes)}; valid colours: {list(self.colours)}")
        return self.object_id(shapes[0], colours[0])

    def object_ids(self, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([self.object_for_prompt(p) for p in prompts], dtype=torch.long)

    def albedo(self, object_id: int) -> tuple[float, float, float]:
        return COLOURS[self.objects[int(object_id)].colour]

    def field(self, object_ids: Tensor) -> PrimitivesField:
        """Batched analytic field for ``object_ids`` [B] (long)."""
        ids = torch.as_tensor(object_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_objects):
            raise ValueError(f"object ids must lie in [0, {self.num_objects}), got {ids.tolist()}")
        table = torch.tensor([COLOURS[c] for c in self.colours], dtype=torch.float32, device=ids.device)
        return PrimitivesField(shape_ids=ids // len(self.colours), albedo_table=table[ids % len(self.colours)],
                               world=self)

    # -- corpus splits ---------------------------------------------------------------------------
    def held_out_objects(self) -> list[int]:
        """Colour i is held out with shape i mod |shapes|: each colour once, each shape at least
        once (when |colours| >= |shapes|), and each held-out shape/colour still appears in train."""
        return [self.object_id(self.shapes[i % len(self.shapes)], c) for i, c in enumerate(self.colours)]

    def held_out_prompts(self) -> list[str]:
        return [self.prompt(i) for i in self.held_out_objects()]

    def corpus_splits(self) -> dict[str, list[str]]:
        """train: seen combos; val: held-out + as many seen (shape (i+2) mod |shapes|); test: all."""
        held = set(self.held_out_objects())
        train = [self.prompt(i) for i in range(self.num_objects) if i not in held]
        seen_val = [self.object_id(self.shapes[(i + 2) % len(self.shapes)], c) for i, c in enumerate(self.colours)]
        val = self.held_out_prompts() + [self.prompt(i) for i in seen_val if i not in held]
        return {"train": train, "val": val, "test": self.prompts()}

    def corpus_json(self) -> str:
        """The exact text of ``data/prompt_corpora/primitives.json``."""
        return json.dumps(self.corpus_splits(), indent=2) + "\n"


def corpus_splits() -> dict[str, list[str]]:
    return PrimitivesWorld().corpus_splits()


def held_out_prompts() -> list[str]:
    return PrimitivesWorld().held_out_prompts()


if __name__ == "__main__":  # regenerate the authored corpus: python -m amortized3d.scenes.primitives > ...
    print(PrimitivesWorld().corpus_json(), end="")
