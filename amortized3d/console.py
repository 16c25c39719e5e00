"""What a script prints: one line per event, no advertising, and where the outputs went.

Hydra configures the root logger (configs/hydra/default.yaml: a short console line, the full one in
the run dir's ``<script>.log``). Lightning, on import, attaches its own stderr handler to the
``lightning`` logger *and* lets records propagate to the root, so every Lightning line printed twice;
it also prints advertising tips at ``Trainer`` construction. :func:`setup_console` (called by the
scripts once Hydra has configured logging) leaves Lightning's records to the root handlers, drops the
tips, and ignores three warnings that are known not to concern this project (each named below, by its
exact message; every other warning still prints).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

# Lightning's loggers that may carry its own console handler (lightning/__init__.py always;
# lightning.pytorch / lightning.fabric when imported before logging was configured).
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# Where Lightning's tips are logged from (rank_zero_info).
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_TIP_PREFIX = "💡 Tip:"
# Warnings that are not about this project's use of the libraries:
_KNOWN_NOISE = (
    # lightning's own use of a torch pytree API that torch deprecated (a lightning/torch version matter)
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the frozen prior (no trainable parameters) is in eval mode on purpose; Lightning warns about any
    # module in eval mode at the start of fit
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # the system's checkpoint at step N holds the state after step N's update by design (a resume
    # continues with step N + 1, tested bit-exact); Lightning suggests saving pre-update copies instead
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
)
# What a training run leaves, in the order README's table lists it (those present are named).
_OUTPUTS = ("checkpoints/last.ckpt", "metrics.json", "videos", "renders/val", "csv/metrics.csv", "wandb")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP_PREFIX)


def setup_console() -> None:
    """Make Lightning's log lines print once (through the root handlers), without its tips."""
    if logging.getLogger().hasHandlers():  # only hand over to handlers that exist (Hydra's)
        for name in _LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # Lightning's console handler, not a file
                    logger.removeHandler(handler)
            logger.propagate = True
    for name in _TIP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    for message in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)


def report_outputs(run_dir: str | Path) -> str:
    """Log (rank 0) and return one line naming the run dir and the outputs it holds."""
    run_dir = Path(run_dir)
    present = []
    for name in _OUTPUTS:
        path = run_dir / name
        if path.is_file():
            present.append(name)
        elif path.is_dir() and any(path.iterdir()):
            present.append(f"{name}/ ({sum(1 for p in path.rglob('*') if p.is_file())} files)")
    line = f"outputs in {run_dir}: {', '.join(present) or 'none'}"
    if rank_zero_only.rank == 0:
        log.info(line)
    return line
