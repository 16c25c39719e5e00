"""A tiny Stable Diffusion saved once per test session, and the overrides that train against it."""
from __future__ import annotations

from pathlib import Path

from conftest import TINY

# Everything of conftest.TINY except the analytic prior's own keys, plus tiny SD sizes: 16 px
# renders, a 16 px "VAE resolution" (a one-level VAE: latents 4x16x16) and a small hash grid.
SD_TINY = [o for o in TINY if not o.startswith("prior.model.")] + [
    "prior=stable_diffusion",
    "prior.text_encoder.embedding_dim=32",
    "prior.model.vae_resolution=16",
    "prior.local_files_only=true",
    "generator.encoding.n_levels=4",
    "generator.encoding.log2_hashmap_size=12",
    "generator.encoding.base_resolution=8",
    "prior.scene_bound=1.0",  # the one scene bound: renderer sphere and hash grid follow it
    # Eager lookups: compiling costs ~30 s per test process; the configured compiled path (on for hyper_ingp on
    # SD) trains and resumes in test_sd_train.py's slow test.
    "generator.encoding.compile=false",
]


def sd_overrides(model_dir: Path, *extra: str) -> list[str]:
    return [*SD_TINY, f"prior.pretrained_model_name_or_path={model_dir}", *extra]
