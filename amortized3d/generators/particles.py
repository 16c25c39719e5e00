"""Which particle a generator renders outside training (evaluation, export, diversity metrics).

A generator with ``num_particles`` = n > 1 holds n fields per prompt (generators/ingp.py; during
training the system passes the step's drawn particle ids as ``z``), or, for 3DConv-net, n fixed latent
draws per prompt that evaluation renders in turn (generators/conv3d.py). Every other caller renders
through ``system.render(prompts, cameras)`` with no z, so the particle is chosen here, for the
duration of a ``with`` block, instead of threading a particle argument through every render path.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


def num_particles(generator: nn.Module) -> int:
    """n for a particle generator, 1 for every other generator."""
    return int(getattr(generator, "num_particles", 1))


@contextlib.contextmanager
def rendering_particle(generator: nn.Module, particle: int | None) -> Iterator[None]:
    """Inside the block, ``generator(text_emb, ids)`` (no z) is particle ``particle`` of each prompt.

    ``None`` leaves the generator as it is (particle 0 of a particle generator); a particle of a
    generator without particles other than 0 is an error, as is one outside [0, n)."""
    if particle is None:
        yield
        return
    n = num_particles(generator)
    if not 0 <= int(particle) < n:
        raise ValueError(f"particle={particle} but {type(generator).__name__} has {n} particle(s) per prompt "
                         f"(valid: 0..{n - 1}; generator.num_particles sets n)")
    if n == 1:
        yield
        return
    previous = generator.eval_particle
    generator.eval_particle = int(particle)
    try:
        yield
    finally:
        generator.eval_particle = previous
