"""Shared test helpers: compose the project's real Hydra configs with tiny, fast overrides."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"

# A 16 px world with few references and samples: every part of the real pipeline, in seconds.
TINY = [
    "data.batch_size=2",
    "prior.render.resolution=16",
    "prior.render.num_samples=8",
    "prior.render.num_importance=8",
    "prior.model.views_per_object=8",
    "trainer.max_steps=3",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "callbacks.checkpoint.every_n_train_steps=2",
    "~callbacks.progress_bar",
    "evaluation.splits=[]",
    "evaluation.videos=null",
    "evaluation.num_views=4",
    "evaluation.bake_resolution=32",
    "system.val_views=2",
    "callbacks.validation_metrics.num_views=2",
    "callbacks.validation_metrics.video_dir=null",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (text embeddings, reference renders) for the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _single_thread():
    # Tests share 2 cores with each other's processes; spinning OpenMP threads only slow them down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_COMPOSED: dict = {}  # (tiny, overrides without the run paths) -> the composed config, once per session
_RUN_PATHS = ("output_dir", "cache_dir", "root_dir")


def compose(output_dir: Path, cache_dir: Path, *overrides: str, tiny: bool = True):
    """The real `configs/train.yaml` composition, as `scripts/train.py` would see it.

    Hydra composes each distinct override list once per session; every call gets a copy with its own
    run paths (``paths.output_dir``, ``cache_dir``, ``root_dir``, given here or as overrides) set on it.
    Those keys are only read through interpolations, which OmegaConf resolves on access, so the copy
    equals a fresh composition with the path overrides. Why: a composition takes ~0.3 s, and the fast
    suite's 363 took 112 s of its 446 s on the AVX2 EPYC, mostly for override lists differing only in
    their tmp paths.
    """
    import copy

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    paths = {"output_dir": str(output_dir), "cache_dir": str(cache_dir), "root_dir": str(ROOT)}
    rest = []
    for override in overrides:
        key, _, value = override.partition("=")
        name = key.removeprefix("paths.")
        if name != key and name in _RUN_PATHS:
            paths[name] = value
        else:
            rest.append(override)
    key = (tiny, tuple(rest))
    if key not in _COMPOSED:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            _COMPOSED[key] = hydra_compose("train", overrides=(TINY if tiny else []) + rest)
    cfg = copy.deepcopy(_COMPOSED[key])
    for name, value in paths.items():
        cfg.paths[name] = value
    return cfg


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion in the diffusers layout (built from config, saved once)."""
    from amortized3d.priors.sd_random import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
