"""The primitives world: exact SDFs, prompt parsing, corpus splits and the authored corpus file."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from amortized3d.generators.base import Field
from amortized3d.scenes import COLOURS, SHAPES, PrimitivesWorld, corpus_splits, held_out_prompts

WORLD = PrimitivesWorld()
CORPUS_FILE = Path(__file__).resolve().parents[1] / "data" / "prompt_corpora" / "primitives.json"


def test_objects_ids_and_prompts_round_trip():
    assert WORLD.num_objects == 30 == len(WORLD.objects)
    assert len(set(WORLD.objects)) == 30
    assert WORLD.prompt(WORLD.object_id("cube", "red")) == "a red cube"
    assert WORLD.prompt(WORLD.object_id("torus", "orange")) == "an orange torus"
    for i in range(WORLD.num_objects):
        assert WORLD.object_for_prompt(WORLD.prompt(i)) == i
    assert len(set(WORLD.prompts())) == 30


def test_prompt_parser_tolerance_and_errors():
    red_cube = WORLD.object_id("cube", "red")
    assert WORLD.object_for_prompt("A Red CUBE") == red_cube
    assert WORLD.object_for_prompt("the red cube, front view") == red_cube
    with pytest.raises(ValueError, match="valid shapes.*sphere.*valid colours.*red"):
        WORLD.object_for_prompt("a red dodecahedron")
    with pytest.raises(ValueError):
        WORLD.object_for_prompt("a red blue cube")
    with pytest.raises(ValueError):
        WORLD.object_for_prompt("a cube")


def test_corpus_splits_hold_out_unseen_compositions():
    splits = corpus_splits()
    held = held_out_prompts()
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert (len(train), len(val), len(test), len(held)) == (24, 12, 30, 6)
    assert set(test) == set(WORLD.prompts()) and not set(held) & set(train)
    assert set(held) | set(train) == set(test)
    assert val[:6] == held and set(val[6:]) <= set(train) and len(set(val)) == 12
    held_objects = [WORLD.objects[WORLD.object_for_prompt(p)] for p in held]
    assert sorted(o.colour for o in held_objects) == sorted(COLOURS)  # each colour held out once
    assert {o.shape for o in held_objects} == set(SHAPES)  # each shape at least once
    train_objects = [WORLD.objects[WORLD.object_for_prompt(p)] for p in train]
    for o in held_objects:  # every held-out combination is composed of seen words
        assert any(t.shape == o.shape for t in train_objects)
        assert any(t.colour == o.colour for t in train_objects)
    assert "a red cube" in train


def test_authored_corpus_file_matches_code():
    assert CORPUS_FILE.read_text() == WORLD.corpus_json()
    assert json.loads(CORPUS_FILE.read_text()) == corpus_splits()


def _all_field() -> tuple[Field, torch.Tensor]:
    ids = torch.arange(WORLD.num_objects)
    return WORLD.field(ids), ids


def test_field_protocol_shapes_and_albedo():
    field, ids = _all_field()
    assert isinstance(field, Field) and field.kind == "sdf" and field.batch_size == 30
    pts = torch.rand(30, 50, 3) - 0.5
    sdf, albedo = field.query(pts)
    assert sdf.shape == (30, 50) and albedo.shape == (30, 50, 3)
    for i in ids.tolist():
        assert torch.allclose(albedo[i], torch.tensor(WORLD.albedo(i)).expand(50, 3))
        assert ((albedo[i] >= 0) & (albedo[i] <= 1)).all() and albedo[i].min() < 0.2  # far from white
    with pytest.raises(ValueError):
        field.query(torch.zeros(3, 5, 3))


def test_batched_query_equals_per_object_query():
    ids = torch.tensor([3, 17, 3, 29, 8, 12])
    pts = torch.rand(len(ids), 40, 3, dtype=torch.float64) - 0.5
    sdf, albedo = WORLD.field(ids).query(pts)
    assert sdf.dtype == torch.float64
    for b, i in enumerate(ids.tolist()):
        s1, a1 = WORLD.field(torch.tensor([i])).query(pts[b:b + 1])
        assert torch.allclose(sdf[b], s1[0]) and torch.allclose(albedo[b], a1[0])


def test_sdfs_are_exact_and_bounded():
    field, _ = _all_field()
    torch.manual_seed(0)
    pts = (torch.rand(30, 2000, 3) * 2 - 1).requires_grad_()
    sdf, _ = field.query(pts)
    (grad,) = torch.autograd.grad(sdf.sum(), pts)
    assert torch.allclose(grad.norm(dim=-1), torch.ones(30, 2000), atol=1e-4)  # eikonal
    # Exactness: stepping by the SDF along the gradient lands on the surface.
    proj = pts.detach() - sdf.detach()[..., None] * grad / grad.norm(dim=-1, keepdim=True)
    assert field.query(proj)[0].abs().max() < 1e-4
    # Inside at the origin (the torus hole is the exception), outside beyond the bounding radius.
    origin = field.query(torch.zeros(30, 1, 3))[0][:, 0]
    torus = torch.tensor([o.shape == "torus" for o in WORLD.objects])
    assert (origin[~torus] < 0).all() and (origin[torus] > 0).all()
    d = torch.randn(30, 500, 3)
    shell = d / d.norm(dim=-1, keepdim=True) * (WORLD.bounding_radius + 0.01)
    assert (field.query(shell)[0] > 0).all()
    assert sdf.detach().min(dim=1).values.max() < 0  # every object has volume


@pytest.mark.parametrize("shape,point,expected", [
    ("sphere", (1.0, 0.0, 0.0), 1.0 - 0.38),
    ("cube", (0.0, 0.0, 1.0), 1.0 - 0.26),
    ("cylinder", (0.0, 1.0, 0.0), 1.0 - 0.28),
    ("cylinder", (0.0, 0.0, -1.0), 1.0 - 0.30),
    ("cone", (0.0, 0.0, 1.0), 1.0 - 0.30),  # apex up
    ("cone", (0.0, 0.0, -1.0), 1.0 - 0.30),  # flat base
    ("torus", (0.30, 0.0, 0.0), -0.12),
    ("torus", (0.0, 0.0, 0.0), 0.30 - 0.12),
])
def test_sdf_closed_form_values(shape, point, expected):
    sdf, _ = WORLD.field(torch.tensor([WORLD.object_id(shape, "red")])).query(torch.tensor([[point]]))
    assert math.isclose(float(sdf), expected, abs_tol=1e-5)


def test_cone_tapers_upwards():
    cone = WORLD.field(torch.tensor([WORLD.object_id("cone", "blue")]))
    low, high = torch.tensor([[[0.25, 0.0, -0.25]]]), torch.tensor([[[0.25, 0.0, 0.25]]])
    assert float(cone.query(low)[0]) < 0 < float(cone.query(high)[0])


def test_invalid_ids_and_world_config():
    with pytest.raises(ValueError):
        WORLD.field(torch.tensor([30]))
    with pytest.raises(ValueError):
        PrimitivesWorld(shapes=("cube", "pyramid"))
    small = PrimitivesWorld(shapes=["cube", "sphere"], colours=["red", "blue"])  # hydra lists
    assert small.num_objects == 4 and small.prompt(0) == "a red cube" and hash(small)
