"""Procedural ground-truth worlds whose renders back the analytic prior."""
from amortized3d.scenes.primitives import (
    BOUNDING_RADIUS,
    COLOURS,
    SHAPES,
    PrimitiveObject,
    PrimitivesField,
    PrimitivesWorld,
    corpus_splits,
    held_out_prompts,
)

__all__ = ["BOUNDING_RADIUS", "COLOURS", "SHAPES", "PrimitiveObject", "PrimitivesField", "PrimitivesWorld",
           "corpus_splits", "held_out_prompts"]
