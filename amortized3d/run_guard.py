"""Guards around a training run: fail loudly and early, never run forever, never resume into
a different experiment, and stop cleanly on preemption.

* :func:`validate_config`: typed config values checked before any work, naming the key.
* :func:`check_world_prompts`: every corpus prompt parsed by the analytic world's grammar first.
* :func:`check_corpus_splits`: every split the run will read (training, validation, the end-of-run evaluation)
  is in the corpus.
* :func:`clean_stale_temp_files`: ``.<name>.<pid>.tmp`` left by killed atomic writes (dead pids only).
* :func:`check_run_dir`: a fresh run refuses a run dir that already holds checkpoints.
* :func:`compare_resume`: the checkpoint's config / prompts against the new run's; experiment
  changes fail with a readable diff and the override (``resume.force=true``), settings a user
  may change (lr, max_steps extension, logging) are returned to be applied and recorded. A config
  recorded in an older layout (``config_version``) is migrated first
  (:mod:`amortized3d.config_version`), so a moved key is not a changed experiment.
* :class:`Interrupted`: what :class:`amortized3d.callbacks.PreemptionHandler` raises after SIGTERM / SIGUSR1 /
  SIGINT saved ``last.ckpt`` ("interrupted at step N; resume with ckpt_path=...").

Lightning-free (omegaconf and the standard library; torch only inside the checkpoint and world checks), so
``scripts/train.py`` reports a mistyped config value before importing Lightning (~7 s on the AVX2 EPYC).

Every user-facing failure is a :class:`RunError`: ``scripts/train.py`` prints its message as
one ``error: ...`` line (no traceback) and exits with ``exit_code``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from amortized3d.allocator import MODES as ALLOCATOR_MODES
from amortized3d.config_version import migrate_config

FORCE_OVERRIDE = "resume.force=true"
OVERWRITE_OVERRIDE = "overwrite=true"


class RunError(Exception):
    """A failure the user can act on; its message is the whole report (one line where possible)."""

    exit_code = 1


class ConfigError(RunError):
    exit_code = 2


class DivergenceError(RunError):
    exit_code = 3


class ResumeMismatchError(RunError):
    exit_code = 4


class CheckpointReadError(RunError, ValueError):
    """A checkpoint that cannot be read; the message names its path."""


class Interrupted(RunError):
    """Raised after a preemption signal once ``last.ckpt`` is written; exit status 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


# ------------------------------------------------------------------------------------- config
_INT = "an integer"
_POS_INT = "a positive integer"
_NONNEG_INT = "a non-negative integer"
# key -> kind (or its valid values): checked before anything is built (absent optional keys are skipped).
TYPED_KEYS: dict[str, str | tuple[str, ...]] = {
    "seed": _NONNEG_INT,
    "cpu_allocator": ALLOCATOR_MODES,
    "trainer.max_steps": _POS_INT,
    "trainer.log_every_n_steps": _POS_INT,
    "trainer.val_check_interval": "number",
    "data.batch_size": _POS_INT,
    "data.views_per_prompt": _POS_INT,
    "data.shuffle": "bool",
    "system.resolution": _POS_INT,
    "system.val_views": _POS_INT,
    "system.max_consecutive_nonfinite": _POS_INT,
    "system.optimizer.lr": "positive number",
    "callbacks.checkpoint.every_n_train_steps": _POS_INT,
    "prior.render.resolution": _POS_INT,
    "prior.render.num_samples": _POS_INT,
    "prior.render.num_importance": _NONNEG_INT,
    "prior.model.views_per_object": _POS_INT,
    "evaluation.num_views": _POS_INT,
    "resume.force": "bool",
    "overwrite": "bool",
}


def _check_value(key: str, value: Any, kind: str | tuple[str, ...]) -> str | None:
    if isinstance(kind, tuple):
        return None if value in kind else "one of " + ", ".join(kind)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or (isinstance(value, float) and value == value and abs(value) != float("inf"))
    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    if kind == "number":
        return None if is_num and value > 0 else "a positive number (steps, or a fraction of an epoch)"
    if kind == "positive number":
        return None if is_num and value > 0 else "a positive finite number"
    if not is_int:
        return kind
    if kind == _POS_INT and value < 1:
        return kind
    if kind == _NONNEG_INT and value < 0:
        return kind
    return None


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming every mistyped key and its value (before any work)."""
    problems = []
    for key, kind in TYPED_KEYS.items():
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception as e:  # an interpolation that does not resolve
            problems.append(f"{key}: {e}")
            continue
        if value is None:
            continue
        expected = _check_value(key, value, kind)
        if expected is not None:
            problems.append(f"{key}={value!r} must be {expected}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


# ------------------------------------------------------------------------------------- prompts
def check_world_prompts(cfg: DictConfig, corpus) -> None:
    """With the analytic prior, there is a world and every prompt of the corpus parses in its grammar."""
    model = cfg.prior.get("model") or {}
    if not str(model.get("_target_", "")).endswith("build_analytic_prior"):
        return
    from amortized3d.scenes.world import build_world

    world = build_world(cfg)
    if world is None:
        raise ConfigError(f"prior={cfg.prior.get('name')} is the exact denoiser of a ground-truth world, but this "
                          f"run has none (world: null, corpus {corpus.name!r}); use data=primitives")
    bad: list[str] = []
    first_error = ""
    for split, prompts in corpus.splits.items():
        for i, prompt in enumerate(prompts):
            try:
                world.object_for_prompt(prompt)
            except ValueError as e:
                first_error = first_error or str(e)
                bad.append(f"{split}[{i}] {prompt!r}")
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        valid = first_error.split("; ", 1)[-1] if "; " in first_error else first_error
        raise ConfigError(f"corpus {corpus.source}: {len(bad)} prompt(s) outside the analytic world "
                          f"{world.name!r}: {shown}; {valid}")


def check_corpus_splits(cfg: DictConfig, corpus) -> None:
    """Every split the run reads exists in the corpus, checked before any work: the data module reads
    ``data.train_split`` and ``data.val_split`` after the text encoder is built, the end-of-run evaluation
    ``evaluation.splits`` and ``evaluation.videos`` after all of training (an empty split is fine)."""
    readers: dict[str, list[str]] = {}
    evaluation = cfg.get("evaluation") or {}
    for key, value in (("data.train_split", cfg.data.get("train_split", "train")),
                       ("data.val_split", cfg.data.get("val_split", "val")),
                       *(("evaluation.splits", s) for s in (evaluation.get("splits") or [])),
                       ("evaluation.videos", evaluation.get("videos"))):
        if value is not None and str(value) not in corpus.splits:
            readers.setdefault(str(value), []).append(key)
    if readers:
        have = ", ".join(corpus.splits)
        missing = "; ".join(f"no split {split!r} (its splits: {have}), named by {', '.join(keys)}"
                            for split, keys in readers.items())
        raise ConfigError(f"corpus {corpus.source}: {missing}; add the split to the file (an empty list is "
                          f"allowed) or point those keys at one it has, e.g. data.val_split=train "
                          f"'evaluation.splits=[train]' evaluation.videos=null")


# ------------------------------------------------------------------------------------- run dir
_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temp_files(*dirs: str | os.PathLike | None) -> list[Path]:
    """Remove ``.<name>.<pid>.tmp`` files (atomic writes of killed processes) whose pid is dead."""
    removed = []
    for d in dirs:
        if d is None or not Path(d).is_dir():
            continue
        for path in Path(d).rglob(".*.tmp"):
            m = _TMP.match(path.name)
            if m and path.is_file() and not _pid_alive(int(m.group(1))):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed


def check_run_dir(checkpoint_dir: Path, resuming: bool, overwrite: bool, delete: bool = True) -> None:
    """A fresh run must not mix with (or replace) another run's checkpoints; ``overwrite`` deletes
    them (``delete=False``: check only, e.g. on ranks other than 0)."""
    existing = sorted(p.name for p in checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    if not existing or resuming:
        return
    if not overwrite:
        shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
        raise ConfigError(f"run dir {checkpoint_dir.parent} already holds checkpoints ({shown}); resume it with "
                          f"ckpt_path={checkpoint_dir / 'last.ckpt'}, choose another hydra.run.dir, or start over "
                          f"(deletes them) with {OVERWRITE_OVERRIDE}")
    for name in existing if delete else ():
        (checkpoint_dir / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- resume
# Settings a user may change on resume: applied (see AmortizedSystem.on_train_start) and recorded.
MAY_CHANGE = ("system.optimizer.lr", "system.optimizer.lr_scale", "system.optimizer.group_lr",
              "system.optimizer.betas", "system.optimizer.eps", "system.optimizer.weight_decay",
              "system.val_views", "system.max_consecutive_nonfinite", "data.val_max_prompts",
              "trainer.", "logger", "callbacks", "evaluation", "task_name", "data.val_split", "data.test_split",
              "debug",
              # Render implementation paths (fused MLP heads: float64-equal; skipping: images equal to ~1e-7),
              # so the same experiment; on for the analytic quickstart since session 8, off in older runs.
              "generator.fused_mlp", "renderer.skip_empty_space",
              # skipped samples composited black instead of with the proposal's albedo (session 14): images
              # change by less than the skipped samples' weights (measured <= 4e-4)
              "renderer.proposal_albedo",
              # the dense levels' table-gradient kernel (session 9): equal to summation order
              "generator.encoding.dense_backward", "generator.encoding.hashed_lookup",
              # the render lookups through torch.compile (session 12): equal to rounding
              "generator.encoding.compile",
              # the dense levels' eager forward by plane gathers (session 14): equal to rounding
              "generator.encoding.dense_lookup",
              # where the CPU allocator takes large blocks from (session 10): results unchanged
              "cpu_allocator")
# Not compared: where files live, resume controls, and the corpus source (its prompts are compared).
IGNORED = ("paths", "ckpt_path", "resume", "overwrite", "hydra", "data.corpus", "data.corpus_path",
           "data.num_train_prompts", "prior.model.cache_dir")
# Changing any of these invalidates the Adam state's meaning / exactness of the run.
NOT_MAY_CHANGE = ("trainer.precision",)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


_ABSENT = "<absent>"


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def describe_prompt_change(old: Sequence[str], new: Sequence[str]) -> str | None:
    old, new = list(old), list(new)
    if old == new:
        return None
    if sorted(old) == sorted(new):
        i = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
        return (f"train prompts: same {len(old)} prompts in another order (first at #{i}: "
                f"{old[i]!r} -> {new[i]!r}); per-prompt fields and the data stream follow the order")
    removed = [p for p in old if p not in set(new)]
    added = [p for p in new if p not in set(old)]
    parts = [f"train prompts: {len(old)} -> {len(new)}"]
    if removed:
        parts.append(f"removed {len(removed)} (e.g. {removed[0]!r})")
    if added:
        parts.append(f"added {len(added)} (e.g. {added[0]!r})")
    if not removed and not added:
        parts.append("same prompts, other order or duplicates")
    return ", ".join(parts)


def load_checkpoint_meta(path: str | os.PathLike) -> dict:
    """What a resume compares: {config, config_version, train_prompts, text_encoder, global_step, ...}
    of a checkpoint (``config_version`` 0: written before the stamp)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist")
    from amortized3d.checkpoint_io import AtomicCheckpointIO

    try:  # the reader the resume itself uses (Lightning calls the same CheckpointIO)
        ckpt = AtomicCheckpointIO().load_checkpoint(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file
        message = str(e) if str(path) in str(e) else f"cannot read checkpoint {path}: {type(e).__name__}: {e}"
        raise CheckpointReadError(message) from e
    state = ckpt.get("amortized3d", {}) if isinstance(ckpt, dict) else {}
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    loops = ckpt.get("loops", {}) if isinstance(ckpt, dict) else {}
    batches = (loops.get("fit_loop", {}).get("epoch_loop.state_dict", {}) or {}).get("_batches_that_stepped")
    return {"path": str(path), "config": hp.get("config") or {}, "config_version": state.get("config_version", 0),
            "train_prompts": state.get("train_prompts"),
            "text_encoder": state.get("text_encoder"), "global_step": int(ckpt.get("global_step", 0)),
            "batch_index": int(state.get("batch_index", 0)), "batches_that_stepped": batches,
            "wandb_id": state.get("wandb_id")}


def compare_resume(meta: Mapping, config: Mapping, train_prompts: Sequence[str] | None,
                   force: bool = False) -> dict[str, Any]:
    """Compare a checkpoint's stored config and prompts with the new run's (plain dicts).

    Returns ``{"changed": {key: [old, new]}, "forced": [lines]}``: the changed may-change settings
    (to apply and record) and, with ``force``, the experiment differences that were forced; raises
    :class:`ResumeMismatchError` listing every experiment-changing difference unless ``force``.
    The stored config is first migrated from its ``meta["config_version"]`` (absent: 0) to the
    current layout; keys that layout never recorded (published properties, read only through the
    compared keys that use them) are skipped where the stored config lacks them.
    """
    try:
        old = migrate_config(meta.get("config") or {}, meta.get("config_version", 0))
    except ValueError as e:
        raise ResumeMismatchError(f"ckpt_path={meta.get('path')}: {e}") from e
    # A checkpoint without a stored config (not written by train()) has nothing to compare.
    old_flat, new_flat = _flatten(old.config), (_flatten(config) if meta.get("config") else {})
    changed: dict[str, list] = {}
    blocking: list[str] = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if _matches(key, IGNORED):
            continue
        before, new = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if before == new or (before is _ABSENT and _matches(key, old.unrecorded)):
            continue
        if _matches(key, MAY_CHANGE) and not _matches(key, NOT_MAY_CHANGE):
            changed[key] = [before, new]
        else:
            blocking.append(f"{key}: {_short(before)} -> {_short(new)}")
    max_steps = _flatten(config).get("trainer.max_steps")
    if isinstance(max_steps, int) and max_steps <= int(meta.get("global_step", 0)):
        changed.pop("trainer.max_steps", None)
        blocking.append(f"trainer.max_steps: {max_steps} is not past the checkpoint's step {meta.get('global_step')} "
                        f"(nothing left to train: raise it to continue)")
    if "trainer.max_steps" in changed and any(b.startswith(("guidance.", "system.loss_weights")) for b in blocking):
        blocking.append("(these schedules end at trainer.max_steps: changing it moves them)")
    old_prompts = meta.get("train_prompts")
    if old_prompts is not None and train_prompts is not None:
        change = describe_prompt_change(old_prompts, train_prompts)
        if change:
            blocking.append(change)
    if blocking and not force:
        shown = blocking[:20] + ([f"... and {len(blocking) - 20} more"] if len(blocking) > 20 else [])
        raise ResumeMismatchError(
            f"ckpt_path={meta.get('path')} was trained as a different experiment (checkpoint -> this run):\n  "
            + "\n  ".join(shown)
            + f"\nresume anyway with {FORCE_OVERRIDE} (the checkpoint's weights continue under the new settings), "
              "or start a new run in another hydra.run.dir")
    return {"changed": changed, "forced": blocking}


def check_text_encoder(meta: Mapping, identity: str | None, force: bool = False) -> None:
    old = meta.get("text_encoder")
    if old is not None and identity is not None and old != identity and not force:
        raise ResumeMismatchError(
            f"ckpt_path={meta.get('path')} was trained with text encoder {old!r}, this run uses {identity!r}; "
            f"resume anyway with {FORCE_OVERRIDE}")
