"""The underspecified world (issue 19): set-valued prompts and the analytic prior's exact mixture over a
prompt's set, against a float64 brute force over the set's references."""
from __future__ import annotations

import math

import pytest
import torch

from amortized3d.cameras import VIEW_LABELS
from amortized3d.evaluation.oracle import oracle_views
from amortized3d.priors.analytic import AnalyticPrior, ReferenceSet
from amortized3d.scenes.open_world import OpenPrimitivesWorld, prompt_objects
from amortized3d.scenes.primitives import PrimitivesWorld

WORLD = OpenPrimitivesWorld()


def test_prompts_name_their_object_sets():
    cubes = WORLD.objects_for_prompt("a cube")
    assert [WORLD.prompt(o) for o in cubes] == [f"{'an' if c[0] in 'aeiou' else 'a'} {c} cube" for c in WORLD.colours]
    assert {WORLD.objects[o].colour for o in WORLD.objects_for_prompt("a red object")} == {"red"}
    assert len(WORLD.objects_for_prompt("a red object")) == len(WORLD.shapes)
    assert WORLD.objects_for_prompt("an orange thing, side view") == WORLD.objects_for_prompt("an orange object")
    assert WORLD.objects_for_prompt("an object") == tuple(range(WORLD.num_objects))
    closed = PrimitivesWorld()
    for p in closed.prompts():  # every closed-world prompt keeps its id and is a singleton
        assert WORLD.object_for_prompt(p) == closed.object_for_prompt(p)
        assert WORLD.objects_for_prompt(p) == (closed.object_for_prompt(p),)
    assert prompt_objects(closed, "a red cube") == (closed.object_for_prompt("a red cube"),)
    sets = WORLD.object_sets
    for p in WORLD.open_prompts():
        assert sets[WORLD.object_for_prompt(p)].nonzero().flatten().tolist() == list(WORLD.objects_for_prompt(p))
    for bad in ("a red blue cube", "a cube sphere", "a red", "a cube object", "a shiny cube"):
        with pytest.raises(ValueError):
            WORLD.object_for_prompt(bad)


def _refs(views_per_object: int = 3, hw: int = 4, seed: int = 0) -> ReferenceSet:
    g = torch.Generator().manual_seed(seed)
    m = WORLD.num_objects * views_per_object
    return ReferenceSet(torch.rand(m, 3, hw, hw, generator=g),
                        torch.arange(WORLD.num_objects).repeat_interleave(views_per_object),
                        torch.arange(m) % len(VIEW_LABELS), WORLD.object_for_prompt, object_sets=WORLD.object_sets)


def brute_force(x_t: torch.Tensor, abar: float, refs: torch.Tensor, allowed: list[int], s: float) -> torch.Tensor:
    """E[x0 | x_t] = sum_i p(i | x_t) E[x0 | x_t, i] over the allowed references, one at a time in float64:
    p(i | x_t) ∝ N(x_t; sqrt(abar) r_i, (abar s^2 + 1 - abar) I) (equal prior mass per reference)."""
    x, v = x_t.double().flatten(), abar * s * s + 1 - abar
    logp = torch.stack([-((x - math.sqrt(abar) * refs[i].double().flatten()) ** 2).sum() / (2 * v) for i in allowed])
    w = torch.exp(logp - torch.logsumexp(logp, 0))
    c = math.sqrt(abar) * s * s / v
    return sum(w[k] * (refs[i].double().flatten() * (1 - c * math.sqrt(abar)) + c * x)
               for k, i in enumerate(allowed)).reshape(x_t.shape)


@pytest.mark.parametrize("data_std", [0.0, 0.1])
@pytest.mark.parametrize("prompt", ["a cube", "a red object", "a green torus", "an object"])
def test_open_prior_is_the_exact_mixture_over_the_prompts_set(prompt, data_std):
    refs = _refs()
    prior = AnalyticPrior(refs, data_std=data_std)
    x0_refs = refs.images * 2 - 1
    members = set(WORLD.objects_for_prompt(prompt))
    allowed = [i for i in range(len(x0_refs)) if int(refs.object_ids[i]) in members]
    # x_t near a cube reference (and pure noise): the posterior really has to weigh the set's members.
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([50, 300, 700, 999])
    base = x0_refs[allowed[len(allowed) // 2]].expand(4, -1, -1, -1)
    x_t = prior.schedule.add_noise(base, torch.randn(base.shape, generator=g), t)
    got = prior.predict_x0(x_t, t, prior.text_condition([prompt] * 4), guidance_scale=1.0)
    for n in range(4):
        abar = float(prior.schedule.alphas_cumprod[t[n]])
        torch.testing.assert_close(got[n].double(), brute_force(x_t[n], abar, x0_refs, allowed, data_std),
                                   atol=2e-5, rtol=0)


def test_view_dependent_open_prior_keeps_the_bucket_of_every_member():
    refs = _refs(views_per_object=8)
    prior = AnalyticPrior(refs, view_dependent=True)
    cond = prior.text_condition(["a cube"], view_labels=["back"])
    mask = prior.condition_mask(cond)[0]
    members = set(WORLD.objects_for_prompt("a cube"))
    expected = [(int(o) in members) and VIEW_LABELS[int(v)] == "back" for o, v in zip(refs.object_ids, refs.view_ids)]
    assert mask.tolist() == expected
    assert {int(o) for o in refs.object_ids[mask]} == members  # every colour of the cube, seen from the back


def test_built_prior_uses_the_worlds_sets_and_the_unconditional_branch_is_unchanged(tmp_path):
    from amortized3d.scenes.references import build_analytic_prior

    kwargs = dict(views_per_object=2, resolution=8, view_dependent=False, cache_dir=str(tmp_path), data_std=0.0)
    open_prior = build_analytic_prior("primitives_open", **kwargs)
    closed_prior = build_analytic_prior("primitives", **kwargs)
    torch.testing.assert_close(open_prior.ref_centred, closed_prior.ref_centred)  # the same references
    x0 = open_prior.ref_centred + open_prior.ref_mean
    allowed = [i for i, o in enumerate(open_prior.ref_object_ids.tolist()) if o in WORLD.objects_for_prompt("a torus")]
    x_t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([400])
    got = open_prior.predict_x0(x_t, t, open_prior.text_condition(["a torus"]), 1.0)
    abar = float(open_prior.schedule.alphas_cumprod[400])
    torch.testing.assert_close(got[0].double(), brute_force(x_t[0], abar, x0.reshape(-1, 3, 8, 8), allowed, 0.0),
                               atol=2e-5, rtol=0)
    torch.testing.assert_close(open_prior.predict_x0(x_t, t, open_prior.text_condition([""]), 1.0),
                               closed_prior.predict_x0(x_t, t, closed_prior.text_condition([""]), 1.0))
    # a closed prompt means the same object in both worlds
    torch.testing.assert_close(open_prior.predict_x0(x_t, t, open_prior.text_condition(["a red cube"]), 7.5),
                               closed_prior.predict_x0(x_t, t, closed_prior.text_condition(["a red cube"]), 7.5))


def test_oracle_counts_any_member_of_the_set_as_a_hit():
    refs = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    objects = torch.tensor([0, 0, 1, 1, 2, 2])
    generated = refs[[1, 2, 4]]  # views of objects 0, 1, 2
    res = oracle_views(generated, refs, objects, (0, 1))
    assert res.r_at_1.tolist() == [1.0, 1.0, 0.0]
    assert oracle_views(generated, refs, objects, 2).r_at_1.tolist() == [0.0, 0.0, 1.0]


def test_data_primitives_open_composes_with_the_open_world(tmp_path, cache_dir):
    from conftest import compose

    from amortized3d.scenes.world import build_world

    cfg = compose(tmp_path, cache_dir, "data=primitives_open", "generator=ingp")
    assert cfg.data.corpus == "primitives_open" and isinstance(build_world(cfg), OpenPrimitivesWorld)
    assert type(build_world(compose(tmp_path, cache_dir))) is PrimitivesWorld
