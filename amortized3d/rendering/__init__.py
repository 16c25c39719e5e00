"""Volume rendering of batched fields: densities, sampling, backgrounds, regularizers."""
from .backgrounds import Background, RandomColorBackground, SolidBackground
from .densities import composite_weights, nerf_density, trunc_exp, volsdf_density
from .output import RenderOutput
from .regularizers import REGULARIZERS
from .sampling import sample_pdf, stratified_samples
from .volume_renderer import VolumeRenderer

__all__ = [
    "Background", "RandomColorBackground", "SolidBackground", "RenderOutput", "VolumeRenderer",
    "REGULARIZERS", "composite_weights", "nerf_density", "trunc_exp", "volsdf_density",
    "sample_pdf", "stratified_samples",
]
