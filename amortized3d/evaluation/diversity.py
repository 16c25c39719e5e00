"""Diversity of a prompt's n particles on a world whose prompts have a known SET of valid objects.

ProlificDreamer's claim (§3.2, App. D.3): VSD's particles are samples of the prompt's distribution of
scenes, where SDS's mode seeking collapses them. On the open primitives world (scenes/open_world.py)
that is measurable. For each particle (its orbit renders x_1..x_V), each view's nearest reference over
all references of all objects (every view of every object) names an object; the particle's

    object    = the object most of its views name (ties: the smaller D(o)),
    agreement = the fraction of views that name it,
    PSNR      = -10 log10 D(object),   D(o) = (1/V) sum_v min_{r in refs(o)} mse(x_v, r).

The particle LANDS on its object when the object is in the prompt's set and agreement >=
``min_agreement`` (default 1/2); any other particle is a blend (a different object from different
views) or off the set. The vote, not argmin_o D(o), names the object: a cube that is red from 2 views
and blue from 6 has its smallest mean distance to the PURPLE cube (purple lies between red and blue),
which none of its views shows (tests/test_diversity.py). Per prompt:

    modes_covered = |{valid objects some particle landed on}| / |valid objects|
    blends        = number of particles that landed on no valid object

(with n particles and K valid objects modes_covered is at most min(n, K) / K, recorded as
``max_modes_covered``). Each particle's oracle R@1 / PSNR against the set (evaluation/oracle.py) is
recorded too, so fidelity per particle is reported next to coverage.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from amortized3d.evaluation.oracle import ReferenceRows, oracle_from_mse

MIN_AGREEMENT = 0.5


@dataclass
class Landing:
    """Where one particle is: its nearest object over all views and whether that is a valid landing."""

    object_id: int
    agreement: float  # fraction of views whose nearest reference is of ``object_id``
    psnr: float  # -10 log10 D(object_id), dB
    valid: bool  # object_id is in the prompt's set
    landed: bool  # valid and agreement >= min_agreement
    r_at_1: float  # oracle R@1 against the set (mean over views)
    oracle_psnr: float  # oracle PSNR to the nearest reference of any valid object (mean over views)


def particle_landing(renders: Tensor, references: Tensor | ReferenceRows, reference_objects: Tensor,
                     valid: Sequence[int], min_agreement: float = MIN_AGREEMENT) -> Landing:
    """``renders`` [V,3,H,W] of one particle; ``references`` [M,3,H,W] of all objects (or their ReferenceRows,
    built once for many particles), ids [M]."""
    mse = ReferenceRows.of(references).mse(renders.flatten(1))  # [V, M]
    objects = torch.unique(reference_objects)
    nearest = torch.stack([mse[:, reference_objects == o].min(dim=1).values for o in objects], dim=1)  # [V, O]
    distance = nearest.mean(0)  # D(o)
    votes = torch.bincount(nearest.argmin(dim=1), minlength=len(objects))
    tied = (votes == votes.max()).nonzero().flatten()
    best = int(tied[distance[tied].argmin()])
    obj = int(objects[best])
    agreement = float(votes[best]) / len(renders)
    psnr = float(-10.0 * torch.log10(distance[best].clamp_min(1e-10)))
    is_valid = obj in {int(v) for v in valid}
    oracle = oracle_from_mse(mse, reference_objects, list(valid))
    return Landing(obj, agreement, psnr, is_valid, is_valid and agreement >= min_agreement,
                   float(oracle.r_at_1.mean()), float(oracle.psnr.mean()))


def prompt_diversity(landings: Sequence[Landing], valid: Sequence[int],
                     name: Callable[[int], str] | None = None) -> dict[str, Any]:
    """The per-prompt block: which valid objects the particles landed on, coverage, blends."""
    valid = sorted({int(v) for v in valid})
    hit = sorted({land.object_id for land in landings if land.landed})
    label = name or str
    return {
        "valid_objects": [label(o) for o in valid],
        "objects_hit": [label(o) for o in hit],
        "modes_covered": len(hit) / len(valid),
        "max_modes_covered": min(len(landings), len(valid)) / len(valid),
        "blends": sum(not land.landed for land in landings),
        "particles": [{**asdict(land), "object": label(land.object_id)} for land in landings],
    }


def summarize_diversity(per_prompt: dict[str, dict]) -> dict[str, Any]:
    """Means over prompts; per-particle fidelity averaged over every particle of every prompt."""
    blocks = list(per_prompt.values())
    particles = [p for b in blocks for p in b["particles"]]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "num_prompts": len(blocks),
        "num_particles": len(particles) // max(1, len(blocks)),
        "modes_covered": mean([b["modes_covered"] for b in blocks]),
        "max_modes_covered": mean([b["max_modes_covered"] for b in blocks]),
        "blends": sum(b["blends"] for b in blocks),
        "blend_fraction": mean([float(not p["landed"]) for p in particles]),
        "particle_r_at_1": mean([p["r_at_1"] for p in particles]),
        "particle_psnr": mean([p["oracle_psnr"] for p in particles]),
    }


def wants_diversity(generator, world, prompts: Sequence[str]) -> bool:
    """Measured where there is something to measure: several particles, or a prompt with several valid
    objects (then even one particle per prompt shows which object a guidance picks)."""
    from amortized3d.generators.particles import num_particles
    from amortized3d.scenes.open_world import prompt_objects

    if world is None or not prompts:
        return False
    return num_particles(generator) > 1 or any(len(prompt_objects(world, p)) > 1 for p in prompts)


def world_references(world, scorer, orbit) -> tuple[Tensor, Tensor]:
    """Orbit references of EVERY object of the world: a particle's nearest object must be searched over
    all of them, not only the objects some prompt of the corpus allows (the oracle scorer's candidates:
    with a corpus of "a cube" alone, a red sphere would otherwise be matched among cubes). The
    scorer's references are reused when they already cover the world."""
    from amortized3d.evaluation.oracle import oracle_references

    if scorer is not None and len(torch.unique(scorer.objects)) == world.num_objects:
        return scorer.references, scorer.objects
    return oracle_references(world, [world.prompt(o) for o in range(world.num_objects)], orbit.cameras,
                             orbit.renderer, orbit.bake)


def evaluate_diversity(model, prompts: Sequence[str], world, references: Tensor, reference_objects: Tensor,
                       render: Callable[[Any, str], Tensor], min_agreement: float = MIN_AGREEMENT
                       ) -> dict[str, Any]:
    """Render every particle of every prompt (``render(model, prompt)``, e.g. ``Orbit.render``; ``model``:
    anything with a ``generator``) and measure where they land -> ``{"min_agreement", "overall",
    "per_prompt"}`` for metrics.json."""
    from amortized3d.generators.particles import num_particles, rendering_particle
    from amortized3d.scenes.open_world import prompt_objects

    n = num_particles(model.generator)
    rows = ReferenceRows(references)  # float64 once for every particle of every prompt
    per_prompt = {}
    for prompt in prompts:
        valid = prompt_objects(world, prompt)
        landings = []
        for i in range(n):
            with rendering_particle(model.generator, i):
                renders = render(model, prompt)
            if not torch.isfinite(renders).all():  # (evaluate.check_finite_renders: evaluate imports this module)
                raise ValueError(f"renders of prompt {prompt!r}, particle {i}, hold NaN/inf: refusing to score them")
            landings.append(particle_landing(renders, rows, reference_objects, valid, min_agreement))
        per_prompt[prompt] = prompt_diversity(landings, valid, world.prompt)
    return {"min_agreement": min_agreement, "overall": summarize_diversity(per_prompt), "per_prompt": per_prompt}
