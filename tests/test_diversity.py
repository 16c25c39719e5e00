"""Diversity metrics (issue 19) are exact on hand-built particles: ground-truth fields of known objects
rendered through the evaluation renderer, and renders stitched from several objects' views (blends)."""
from __future__ import annotations

import pytest
import torch

from amortized3d.cameras import orbit_cameras
from amortized3d.evaluation.diversity import evaluate_diversity, particle_landing, prompt_diversity
from amortized3d.evaluation.oracle import oracle_references
from amortized3d.rendering import SolidBackground, VolumeRenderer
from amortized3d.scenes.open_world import OpenPrimitivesWorld

WORLD = OpenPrimitivesWorld()
CAMERAS = orbit_cameras(8, 10)
RENDERER = VolumeRenderer(num_samples=12, num_importance=4, bound_radius=1.0)


@pytest.fixture(scope="module")
def references():
    return oracle_references(WORLD, WORLD.open_prompts(), CAMERAS, RENDERER)  # all 30 objects, 8 views each


def _obj(prompt: str) -> int:
    return WORLD.object_for_prompt(prompt)


class HandBuilt(torch.nn.Module):
    """A particle generator whose particles are ground-truth fields of chosen objects."""

    def __init__(self, objects: dict[str, list[int]]):
        super().__init__()
        self.objects, self.num_particles, self.eval_particle = objects, len(next(iter(objects.values()))), 0


class HandBuiltSystem:
    def __init__(self, objects: dict[str, list[int]]):
        self.generator = HandBuilt(objects)

    def render(self, prompt: str) -> torch.Tensor:
        field = WORLD.field(torch.tensor([self.generator.objects[prompt][self.generator.eval_particle]]))
        return RENDERER(field, CAMERAS, background=SolidBackground()).rgb


def test_particles_on_known_objects_land_exactly_there(references):
    refs, ids = references
    red, blue, green = _obj("a red cube"), _obj("a blue cube"), _obj("a green cube")
    red_sphere = _obj("a red sphere")
    system = HandBuiltSystem({"a cube": [red, red, blue, red_sphere], "a red object": [red, red_sphere, red_sphere,
                                                                                        green]})
    out = evaluate_diversity(system, ["a cube", "a red object"], WORLD, refs, ids, lambda s, p: s.render(p))
    cube, red_obj = out["per_prompt"]["a cube"], out["per_prompt"]["a red object"]
    assert cube["objects_hit"] == ["a red cube", "a blue cube"]
    assert cube["modes_covered"] == pytest.approx(2 / 6) and cube["max_modes_covered"] == pytest.approx(4 / 6)
    assert cube["blends"] == 1  # the red sphere is no cube
    assert [p["object"] for p in cube["particles"]] == ["a red cube", "a red cube", "a blue cube", "a red sphere"]
    assert [p["landed"] for p in cube["particles"]] == [True, True, True, False]
    assert all(p["agreement"] == 1.0 and p["psnr"] > 60 for p in cube["particles"])  # renders == references
    assert [p["r_at_1"] for p in cube["particles"]] == [1.0, 1.0, 1.0, 0.0]
    assert red_obj["objects_hit"] == ["a red sphere", "a red cube"]  # sorted by object id
    assert red_obj["modes_covered"] == pytest.approx(2 / 5) and red_obj["blends"] == 1  # green cube is not red
    overall = out["overall"]
    assert overall["modes_covered"] == pytest.approx((2 / 6 + 2 / 5) / 2)
    assert overall["blends"] == 2 and overall["blend_fraction"] == pytest.approx(2 / 8)
    assert overall["particle_r_at_1"] == pytest.approx(6 / 8) and overall["num_particles"] == 4
    assert system.generator.eval_particle == 0  # restored after the loop


def test_a_particle_that_changes_object_across_views_is_a_blend(references):
    refs, ids = references
    red, blue, yellow, purple = (_obj(f"a {c} cube") for c in ("red", "blue", "yellow", "purple"))
    views = lambda o: refs[ids == o]  # the 8 orbit views of object o, in camera order  # noqa: E731
    valid = WORLD.objects_for_prompt("a cube")
    half = torch.cat([views(red)[:4], views(blue)[4:]])  # 4 + 4 views: no majority object
    quarter = torch.cat([views(red)[:2], views(blue)[2:4], views(yellow)[4:6], views(purple)[6:]])
    mostly = torch.cat([views(red)[:2], views(blue)[2:]])  # 6 of 8 views are the blue cube
    a, b, c = (particle_landing(x, refs, ids, valid) for x in (half, quarter, mostly))
    assert a.agreement == 0.5 and a.object_id in (red, blue) and a.landed  # a tie: lands (>= 1/2)
    assert b.agreement == 0.25 and b.valid and not b.landed  # every view a valid cube, but no one object
    assert c.object_id == blue and c.agreement == 0.75 and c.landed
    # (its smallest mean distance D(o) is to the purple cube, which none of its views shows: why the vote names it)
    d = [sum(float(((v - r) ** 2).mean(dim=(1, 2, 3)).min()) for v in mostly) for r in (views(blue), views(purple))]
    assert d[1] < d[0]
    block = prompt_diversity([b, b], valid, WORLD.prompt)
    assert block["modes_covered"] == 0.0 and block["blends"] == 2 and block["objects_hit"] == []
    assert not particle_landing(mostly, refs, ids, valid, min_agreement=0.8).landed
    assert particle_landing(mostly, refs, ids, valid, min_agreement=0.75).landed


def test_nearest_objects_are_searched_over_the_whole_world(references):
    from amortized3d.evaluation.diversity import world_references
    from amortized3d.evaluation.orbit import Orbit
    from amortized3d.evaluation.scorers import OracleScorer

    orbit = Orbit(CAMERAS, RENDERER, None, {})
    cubes_only = OracleScorer(WORLD, ["a cube"], CAMERAS, RENDERER, None)  # a corpus of one open prompt
    assert len(torch.unique(cubes_only.objects)) == 6
    refs, ids = world_references(WORLD, cubes_only, orbit)
    assert torch.equal(torch.unique(ids), torch.arange(WORLD.num_objects))
    torch.testing.assert_close(refs, references[0])
    red_sphere = refs[ids == _obj("a red sphere")]
    landing = particle_landing(red_sphere, refs, ids, WORLD.objects_for_prompt("a cube"))
    assert landing.object_id == _obj("a red sphere") and not landing.landed
    whole = OracleScorer(WORLD, WORLD.open_prompts(), CAMERAS, RENDERER, None)
    assert world_references(WORLD, whole, orbit)[0] is whole.references  # reused, not rendered again
