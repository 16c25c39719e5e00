"""amortized3d: prompt-amortized text-to-3D score distillation.

Importing the package needs neither CUDA nor tiny-cuda-nn; optional backends are detected
where they are used.
"""
__version__ = "0.1.0"
