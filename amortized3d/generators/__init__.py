"""Generators: text (and prompt ids) -> a batch of 3D fields.

Import-light: nothing here imports CUDA extensions; tinycudann is imported lazily by
``HashGridEncoding`` only when that backend is selected. ``GENERATORS`` maps short config
names to import paths for code that wants a name-based registry besides Hydra ``_target_``.
"""
from amortized3d.generators.base import Field, FieldKind, Generator
from amortized3d.generators.conv3d import Conv3dGenerator
from amortized3d.generators.encodings import HashGridEncoding
from amortized3d.generators.fields import HashGridField
from amortized3d.generators.hyper_ingp import HyperIngpGenerator
from amortized3d.generators.ingp import IngpGenerator

GENERATORS: dict[str, str] = {
    "ingp": "amortized3d.generators.ingp.IngpGenerator",
    "hyper_ingp": "amortized3d.generators.hyper_ingp.HyperIngpGenerator",
    "conv3d": "amortized3d.generators.conv3d.Conv3dGenerator",
}

__all__ = [
    "Conv3dGenerator", "Field", "FieldKind", "Generator", "HashGridEncoding", "HashGridField",
    "HyperIngpGenerator", "IngpGenerator", "GENERATORS",
]
