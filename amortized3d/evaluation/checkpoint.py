"""Rebuild a trained system from a checkpoint alone (its resolved config is stored inside)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from amortized3d.checkpoint_io import CheckpointError, load_torch
from amortized3d.corpora import Corpus, CorpusNotFoundError, load_corpus

log = logging.getLogger(__name__)


def load_system(ckpt_path: str | Path, overrides: Sequence[str] = (), map_location: str = "cpu",
                with_guidance: bool = True):
    """(system, prior, corpus, cfg) with the checkpoint's weights; ``overrides`` as ``key=value``.

    Overrides may change what does not alter parameter shapes (evaluation settings, the cache
    directory, the renderer's sample budget, ...). ``with_guidance=False``: a render-only system
    (prior None), without building the prior (for Stable Diffusion: no UNet or VAE is loaded).
    """
    from amortized3d.train import build_system

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected DIR/checkpoints/last.ckpt "
                                "from scripts/train.py)")
    ckpt = load_torch(path, map_location=map_location)  # checksum verified, weights_only=True
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} holds no state_dict (a {type(ckpt).__name__}); was it written "
                              "by scripts/train.py?")
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not config:
        raise ValueError(f"{path} holds no amortized3d config (hyper_parameters.config); was it written by "
                         "scripts/train.py?")
    cfg = OmegaConf.merge(OmegaConf.create(config), OmegaConf.from_dotlist(list(overrides)))
    saved_prompts = (ckpt.get("amortized3d") or {}).get("train_prompts")
    corpus = _corpus_of(cfg, saved_prompts, path)
    system, prior, corpus = build_system(cfg, corpus, with_guidance=with_guidance, train_prompts=saved_prompts)
    if not with_guidance:
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("guidance.")}
    system.on_load_checkpoint(ckpt)
    system.load_state_dict(ckpt["state_dict"])
    return system.eval(), prior, corpus, cfg


def _corpus_of(cfg, saved_prompts: list[str] | None, path: Path) -> Corpus:
    """The run's corpus; when its file is gone, a train-only corpus of the checkpoint's own prompts.

    The generator is bound to ``saved_prompts`` (the checkpoint's list, in its order) either way, so
    an edited or reordered corpus file can change which prompts are *candidates*, never which field
    renders which prompt; a change is reported.
    """
    try:
        corpus = load_corpus(cfg.data.corpus_path or cfg.data.corpus, search_dirs=[cfg.paths.corpora_dir])
    except CorpusNotFoundError as err:
        if saved_prompts is None:
            raise
        log.warning("%s; using the %d train prompts stored in %s", err, len(saved_prompts), path)
        return Corpus(str(cfg.data.corpus), {cfg.data.train_split: tuple(saved_prompts)}, path, "")
    if saved_prompts is not None and list(corpus.unique(cfg.data.train_split)) != list(saved_prompts):
        log.warning("the train split of corpus %s differs from the %d prompts %s was trained on; the generator "
                    "stays bound to the checkpoint's own prompt list", corpus.name, len(saved_prompts), path)
    return corpus
