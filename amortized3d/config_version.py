"""The layout version of a recorded run config, and the migration of older layouts to the current one.

A checkpoint records the resolved config its run was trained with (``hyper_parameters.config``) and,
from version 1 on, the version of that layout (``amortized3d.config_version``; absent = 0). A resume
compares the recorded config with the new run's key by key (:func:`amortized3d.run_guard.compare_resume`),
so a config recorded in an older layout is first brought to the current one: keys that moved go to
their new place, keys added since get the value that reproduces the old behaviour. Nothing else is
touched, so a genuinely different experiment is still refused.

* **Version 0**: main up to c16c78f, before the restructure of issue 16 (no stamp). Every step of its
  migration applies only where the old layout is found, so a version-1 config written before the
  stamp existed (also no stamp) migrates to itself.
  Checkpoints of the restructured code written before the stamp (main up to 1afc70a) are read as
  version 0 too; they lack only the properties published since (``prior.score_model`` on the analytic
  prior, ``prior.recommended.score_model_lr`` and SDI's settings).
* **Version 1**: the restructured layout: the world is its own node (``world``), the prior publishes
  ``scene_bound`` / ``capacity`` / ``score_model`` / ``recommended``, score models are ``_partial_``
  factories, the renderer's density follows the field kind (``auto``).
* **Version 2**: the per-prompt iNGP has ``generator.sparse_updates`` (issue 15: O(batch) steps with a
  lazy Adam; absent before, which is ``false``, the dense step every older run took) and 3DConv-net has
  ``generator.num_particles`` (issue 19's z draws at evaluation; absent before, which is 1: eval_z alone).
"""
from __future__ import annotations

import copy
import importlib
from typing import Any, Mapping, NamedTuple

CONFIG_VERSION = 2

# Version 0 named the analytic prior's world (prior.model.world) in a registry of one; its references
# were rendered inside the fixed sphere of radius 1.0 (scenes/references.py REFERENCE_RENDERER then).
V0_WORLDS: dict[str, dict[str, Any]] = {
    "primitives": {"_target_": "amortized3d.scenes.primitives.PrimitivesWorld", "bound": 1.0},
}
# Published properties an unstamped config may lack: their values lived in per-pair files and reached the
# run only through the keys that read them (guidance CFG, score model and loss settings, generator
# capacity), which are compared themselves.
V0_UNRECORDED = ("prior.capacity", "prior.recommended", "prior.score_model")
_INGP = "amortized3d.generators.ingp.IngpGenerator"
_HYPER_INGP = "amortized3d.generators.hyper_ingp.HyperIngpGenerator"
_CONV3D = "amortized3d.generators.conv3d.Conv3dGenerator"
_VOLUME_RENDERER = "amortized3d.rendering.VolumeRenderer"


class Migrated(NamedTuple):
    config: dict
    # key prefixes the recorded layout has no record of (skipped by the comparison where absent)
    unrecorded: tuple[str, ...]


def migrate_config(config: Mapping[str, Any], version: int) -> Migrated:
    """``config`` (recorded in layout ``version``) in the layout of :data:`CONFIG_VERSION`; the input is not changed."""
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= CONFIG_VERSION:
        raise ValueError(f"config_version {version!r} is not one this code knows (0..{CONFIG_VERSION}); "
                         "was the checkpoint written by a newer amortized3d?")
    out = copy.deepcopy(dict(config))
    if version == 0:
        _v0_to_v1(out)
    if version <= 1:
        _v1_to_v2(out)
    return Migrated(out, V0_UNRECORDED if version == 0 else ())


def _v1_to_v2(c: dict) -> None:
    generator = _node(c, "generator")
    if generator is not None and generator.get("_target_") == _INGP:
        generator.setdefault("sparse_updates", False)  # the dense step and torch Adam, as every v1 run took
    if generator is not None and generator.get("_target_") == _CONV3D:
        generator.setdefault("num_particles", 1)  # z draws at evaluation: eval_z alone (issue 19 added more)
    if generator is not None and generator.get("_target_") in (_INGP, _HYPER_INGP):
        # The two-head MLPs, the only path unless `+generator.fused_mlp` (a v2 config written before the key
        # existed reports '<absent>' -> the new value, a may-change setting: run_guard.MAY_CHANGE).
        generator.setdefault("fused_mlp", False)


def _node(config: dict, dotted: str) -> dict | None:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _v0_to_v1(c: dict) -> None:
    prior, renderer, generator = _node(c, "prior") or {}, _node(c, "renderer"), _node(c, "generator")
    # The one scene bound: prior.render.bound_radius -> prior.scene_bound (what renderer and grids read).
    render = _node(c, "prior.render")
    if render is not None and "bound_radius" in render:
        prior.setdefault("scene_bound", render.pop("bound_radius"))
    _v0_world(c, prior)
    # Score models: v0's two-phase bind_prior built the same module the v1 factory (_partial_) builds.
    for where in ("prior.score_model", "guidance.score_model"):
        node = _node(c, where)
        if node is not None and "_target_" in node:
            node.setdefault("_partial_", True)
    # The analytic prior's score model moved from guidance/vsd.yaml to the prior (SD's was there already).
    guidance_score_model = _node(c, "guidance.score_model")
    if guidance_score_model is not None and "score_model" not in prior:
        prior["score_model"] = copy.deepcopy(guidance_score_model)
    if renderer is not None and renderer.get("_target_") == _VOLUME_RENDERER:
        renderer.setdefault("nerf_density_activation", "softplus")  # v0's NeRF density activation
        if renderer.get("density") == _density_for(generator):  # v0 named what `auto` now derives
            renderer["density"] = "auto"
    if generator is not None and generator.get("_target_") == _INGP:
        generator.setdefault("num_particles", 1)  # one field per prompt, as v0
        generator.setdefault("check_memory", True)  # a pre-flight refusal only; a v0 run that ran fits
    data = _node(c, "data")
    if data is not None:
        data.setdefault("val_max_prompts", None)  # v0 validated every val prompt


def _v0_world(c: dict, prior: dict) -> None:
    """v0 named the world inside the analytic prior (``prior.model.world: primitives``); v1 has a
    ``world`` node (chosen by the data config: data=primitives) that the prior and the validation
    callback read. Runs on other corpora had no world."""
    if "world" in c:
        return
    model = prior.get("model") if isinstance(prior.get("model"), dict) else {}
    name = model.get("world")
    if name is None and (_node(c, "data") or {}).get("corpus") == "primitives":
        name = "primitives"
    if name is not None and not isinstance(name, str):
        return
    if name is not None and name not in V0_WORLDS:
        return  # unknown to v0's registry: left as recorded, so the comparison names it
    world = copy.deepcopy(V0_WORLDS[name]) if name is not None else None
    c["world"] = world
    if isinstance(model.get("world"), str):
        model["world"] = copy.deepcopy(world)
    metrics = _node(c, "callbacks.validation_metrics")
    if metrics is not None:
        metrics.setdefault("world", copy.deepcopy(world))


def _density_for(generator: dict | None) -> str | None:
    """The density ``renderer.density=auto`` picks for this generator's field kind (None: unknown)."""
    target = (generator or {}).get("_target_")
    if not isinstance(target, str) or "." not in target:
        return None
    from amortized3d.rendering.volume_renderer import _DENSITY_FOR_KIND

    module, name = target.rsplit(".", 1)
    try:
        kind = getattr(importlib.import_module(module), name).field_kind
    except (ImportError, AttributeError):
        return None
    return _DENSITY_FOR_KIND.get(kind)
