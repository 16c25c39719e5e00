"""Rebuild a trained model from a checkpoint alone (its resolved config is stored inside).

Only the model is built and loaded (``model.*`` state keys; pre-split checkpoints are mapped by
:func:`amortized3d.model.upgrade_state_dict`): no guidance, no optimiser. The model is bound to
the checkpoint's own ``train_prompts`` list, so neither an edited corpus file nor another corpus
can make a per-prompt table or field render a prompt it was not trained on.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from omegaconf import DictConfig, OmegaConf

from amortized3d.build import build_model, load_run_corpus, run_corpus
from amortized3d.checkpoint_io import CheckpointError, load_torch
from amortized3d.config_version import migrate_config
from amortized3d.corpora import Corpus, CorpusNotFoundError
from amortized3d.model import AmortizedModel, model_state_dict

log = logging.getLogger(__name__)


class LoadedModel(NamedTuple):
    """What evaluation and export need: no prior (the oracle scores against the world node)."""

    model: AmortizedModel
    corpus: Corpus
    cfg: DictConfig


def load_model(ckpt_path: str | Path, overrides: Sequence[str] = (), map_location: str = "cpu") -> LoadedModel:
    """(model in eval mode, corpus, cfg) with the checkpoint's weights; ``overrides`` as ``key=value``.

    Overrides may change what does not alter parameter shapes (evaluation settings, the cache
    directory, the renderer's sample budget, ...).
    """
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
    state = ckpt.get("amortized3d") or {}
    config = migrate_config(config, state.get("config_version", 0)).config  # an older layout: as today's
    cfg = OmegaConf.merge(OmegaConf.create(config), OmegaConf.from_dotlist(list(overrides)))
    saved_prompts = state.get("train_prompts")
    corpus = _corpus_of(cfg, saved_prompts, path)
    if saved_prompts is None:  # a checkpoint older than the stored list: bound as its run was
        corpus = run_corpus(cfg, corpus)
    model = build_model(cfg, corpus, train_prompts=saved_prompts)
    model.load_state_dict(model_state_dict(ckpt["state_dict"]))
    return LoadedModel(model.eval(), corpus, cfg)


def prompt_list_change(trained: Sequence[str], given: Sequence[str]) -> str | None:
    """What differs between the prompts a model was trained on and a corpus' train split, in words
    (None when they are the same list in the same order)."""
    trained, given = list(trained), list(given)
    if trained == given:
        return None
    missing = [p for p in trained if p not in set(given)]
    extra = [p for p in given if p not in set(trained)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} trained prompt(s) not in it ({_first(missing)})")
    if extra:
        parts.append(f"{len(extra)} prompt(s) the model was not trained on ({_first(extra)})")
    if not parts:
        parts.append("the same prompts in another order")
    return "; ".join(parts)


def _first(prompts: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(p) for p in prompts[:n])
    return shown + (f", ... {len(prompts) - n} more" if len(prompts) > n else "")


def warn_if_prompts_differ(corpus: Corpus, split: str, trained: Sequence[str], source: Any) -> None:
    change = prompt_list_change(trained, corpus.unique(split))
    if change is not None:
        log.warning("the %r split of corpus %s differs from the %d prompts %s was trained on: %s. The model stays "
                    "bound to the checkpoint's own list (each prompt renders from its own table row / field); "
                    "the corpus only supplies candidates, and 'seen' means seen in training", split, corpus.name,
                    len(list(trained)), source, change)


def _corpus_of(cfg, saved_prompts: list[str] | None, path: Path) -> Corpus:
    """The run's corpus; when its file is gone, a train-only corpus of the checkpoint's own prompts.

    The model is bound to ``saved_prompts`` (the checkpoint's list, in its order) either way, so
    an edited or reordered corpus file can change which prompts are *candidates*, never which field
    renders which prompt; a change is reported.
    """
    try:
        corpus = load_run_corpus(cfg)
    except CorpusNotFoundError as err:
        if saved_prompts is None:
            raise
        log.warning("%s; using the %d train prompts stored in %s", err, len(saved_prompts), path)
        return Corpus(str(cfg.data.corpus), {cfg.data.train_split: tuple(saved_prompts)}, path, "")
    if saved_prompts is None:
        log.warning("%s stores no train_prompts (written before they were stored): the model is bound to the train "
                    "split of corpus %s as it reads today, which cannot be checked against the run's", path,
                    corpus.name)
    else:
        try:  # a per-prompt run trained on one prompt of the split
            expected = run_corpus(cfg, corpus)
        except IndexError:  # data.prompt_index is past the edited split's end
            expected = corpus
        warn_if_prompts_differ(expected, cfg.data.train_split, saved_prompts, path)
    return corpus
