"""The underspecified primitives world: prompts whose ground truth is a known SET of objects.

Why: ProlificDreamer's VSD claims diversity (n particles per prompt cover several valid scenes)
where SDS collapses to one mode. In the closed primitives world every prompt has exactly one right
answer, so diversity cannot be measured. Here "a cube" means any of the cube's colours and "a red
object" any red shape, so a prompt's ground truth is a set of objects of the same world and the
analytic prior's conditional branch is the exact uniform mixture over the reference renders of
that set (``ReferenceSet.object_sets``; still an exact posterior-mean denoiser):

    E[x0 | x_t, y] = sum_{i : obj(r_i) in S(y)} w_i r_i,   w = softmax over those references only.

Grammar (articles and view suffixes ignored, as in the closed world):
  "<colour> <shape>"     -> {that object}             (the closed world's prompts parse unchanged)
  "<shape>"              -> that shape in every colour
  "<colour> <wildcard>"  -> that colour on every shape   (wildcard: object, shape, thing, primitive)
  "<wildcard>"           -> every object

Object-set ids: a singleton set has its object's id (0..O-1), so every closed-world id keeps its
meaning; the open sets follow in a fixed order (one per shape, one per colour, then "everything").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from amortized3d.scenes.primitives import _IGNORED_WORDS, PrimitivesWorld

WILDCARDS = frozenset({"object", "shape", "thing", "primitive"})


@dataclass(frozen=True)
class OpenPrimitivesWorld(PrimitivesWorld):
    """The primitives world with set-valued prompts; same objects, same fields, same references."""

    name: ClassVar[str] = "primitives_open"  # configs/world/<name>.yaml; names the reference cache

    @property
    def num_sets(self) -> int:
        return self.num_objects + len(self.shapes) + len(self.colours) + 1

    def _set_members(self, set_id: int) -> tuple[int, ...]:
        o, s, c = self.num_objects, len(self.shapes), len(self.colours)
        if 0 <= set_id < o:
            return (set_id,)
        if o <= set_id < o + s:
            shape = self.shapes[set_id - o]
            return tuple(self.object_id(shape, col) for col in self.colours)
        if o + s <= set_id < o + s + c:
            colour = self.colours[set_id - o - s]
            return tuple(self.object_id(sh, colour) for sh in self.shapes)
        if set_id == o + s + c:
            return tuple(range(o))
        raise ValueError(f"object-set id {set_id} outside [0, {self.num_sets})")

    @property
    def object_sets(self) -> Tensor:
        """[num_sets, num_objects] bool: row k holds the objects of set k (read by the analytic prior)."""
        table = torch.zeros(self.num_sets, self.num_objects, dtype=torch.bool)
        for k in range(self.num_sets):
            table[k, list(self._set_members(k))] = True
        return table

    def object_for_prompt(self, prompt: str) -> int:
        """The id of the prompt's object SET (a singleton's id is its object's id)."""
        words = [w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in _IGNORED_WORDS]
        shapes = [w for w in words if w in self.shapes]
        colours = [w for w in words if w in self.colours]
        wild = [w for w in words if w in WILDCARDS]
        unknown = [w for w in words if w not in self.shapes and w not in self.colours and w not in WILDCARDS]
        if unknown or len(shapes) + len(wild) != 1 or len(colours) > 1:
            raise ValueError(
                f"cannot parse prompt {prompt!r} as '[<colour>] <shape>' or '[<colour>] object' (unknown words "
                f"{unknown}); valid shapes: {list(self.shapes)}; valid colours: {list(self.colours)}; "
                f"wildcards: {sorted(WILDCARDS)}")
        o, s = self.num_objects, len(self.shapes)
        if shapes and colours:
            return self.object_id(shapes[0], colours[0])
        if shapes:
            return o + self.shapes.index(shapes[0])
        if colours:
            return o + s + self.colours.index(colours[0])
        return o + s + len(self.colours)

    def objects_for_prompt(self, prompt: str) -> tuple[int, ...]:
        """The valid objects of ``prompt`` (its ground-truth set), ascending ids."""
        return self._set_members(self.object_for_prompt(prompt))

    # -- corpus ---------------------------------------------------------------------------------
    def open_prompts(self) -> list[str]:
        """One prompt per shape ("a cube": 6 valid objects) and per colour ("a red object": 5)."""
        shapes = [f"{'an' if s[0] in 'aeiou' else 'a'} {s}" for s in self.shapes]
        colours = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} object" for c in self.colours]
        return shapes + colours

    def corpus_splits(self) -> dict[str, list[str]]:
        """Per-prompt generators can only render their training prompts, so every split is the same."""
        prompts = self.open_prompts()
        return {"train": prompts, "val": list(prompts), "test": list(prompts)}

    def corpus_json(self) -> str:
        """The exact text of ``data/prompt_corpora/primitives_open.json``."""
        return json.dumps(self.corpus_splits(), indent=2) + "\n"


def prompt_objects(world, prompt: str) -> tuple[int, ...]:
    """The valid objects of ``prompt`` in ``world``: its set in an open world, its one object otherwise."""
    if hasattr(world, "objects_for_prompt"):
        return tuple(world.objects_for_prompt(prompt))
    return (int(world.object_for_prompt(prompt)),)


def prompts_objects(world, prompts: Sequence[str]) -> list[int]:
    """Every object some prompt of ``prompts`` allows, ascending (the oracle's candidate objects)."""
    return sorted({o for p in prompts for o in prompt_objects(world, p)})


if __name__ == "__main__":  # python -m amortized3d.scenes.open_world > data/prompt_corpora/primitives_open.json
    print(OpenPrimitivesWorld().corpus_json(), end="")
