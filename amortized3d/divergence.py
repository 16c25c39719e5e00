"""The divergence guard: finite-gradient skips, rolled-back steps and the stop after a streak.

Framework-free (torch only). The caller supplies how a 0/1 flag is reduced over ranks
(``reduce_min``; identity on one process), so every rank takes the same decision and DDP
replicas stay identical. The only piece that knows Lightning's internals is
``uncount_lightning_step``, isolated and documented below.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from amortized3d.optim import all_finite, grads_are_finite
from amortized3d.row_sparse import touched_rows


def _identity(flag: Tensor) -> Tensor:
    return flag


@dataclass
class DivergenceGuard:
    """Counts skipped steps and decides when a run has diverged.

    - ``all_finite(opt)``: are this step's gradients finite on every rank? If not, they are
      dropped and the step is counted as skipped (``nonfinite_steps``).
    - ``checked_step(opt, step)``: ``step()`` (the optimizer step), undone if it made any weight
      non-finite (a corrupt optimizer state, an overflowing lr write NaN/inf from finite
      gradients): the weights are copied before and restored after (for a row-sparse gradient only
      its rows); counted as skipped.
    - ``record(stepped, ...)``: after each generator step; True once ``max_consecutive``
      generator steps in a row were skipped (the caller stops the run).
    """

    max_consecutive: int = 5
    reduce_min: Callable[[Tensor], Tensor] = _identity
    device: Any = "cpu"
    nonfinite_steps: int = 0  # steps whose gradients or update were not finite (skipped, counted)
    consecutive: int = 0  # generator steps skipped in a row
    streak: dict = field(default_factory=dict)  # what the current streak saw (for the diagnosis)
    _backups: dict[int, list[Tensor]] = field(default_factory=dict)  # per optimizer: weights before its step

    def _everywhere(self, ok: bool | Tensor) -> bool:
        flag = torch.as_tensor(ok, dtype=torch.float32).to(self.device)
        return self.reduce_min(flag).item() >= 1

    def all_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        """Finite on every rank, or skip everywhere (and count it) so DDP replicas stay identical."""
        if self._everywhere(float(grads_are_finite(optimizer))):
            return True
        self.nonfinite_steps += 1
        optimizer.zero_grad(set_to_none=True)
        return False

    def checked_step(self, optimizer: torch.optim.Optimizer, step: Callable[[], Any] | None = None) -> bool:
        """``step()`` (default ``optimizer.step``); False (weights restored, step counted) if it made
        any weight non-finite on any rank."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # Row-sparse gradients (per-prompt iNGP, sparse_updates) change only their rows: back those up and
        # check them, O(batch); every other parameter whole, into buffers kept across steps.
        rows = {i: r for i, p in enumerate(params) if p.grad is not None and (r := touched_rows(p.grad)) is not None}
        dense = [p for i, p in enumerate(params) if i not in rows]
        backup = self._backups.get(id(optimizer))
        if backup is None or len(backup) != len(dense) or any(b.shape != p.shape for b, p in zip(backup, dense)):
            backup = self._backups[id(optimizer)] = [torch.empty_like(p) for p in dense]
        with torch.no_grad():
            if dense:
                torch._foreach_copy_(backup, [p.detach() for p in dense])
            saved = {i: params[i].detach().index_select(0, r) for i, r in rows.items()}
        (step or optimizer.step)()
        ok = all_finite([p.detach() for p in dense] + [params[i].detach().index_select(0, r) for i, r in rows.items()])
        if self._everywhere(ok):
            return True
        with torch.no_grad():
            if dense:
                torch._foreach_copy_([p.data for p in dense], backup)
            for i, r in rows.items():
                params[i].data.index_copy_(0, r, saved[i])
        self.nonfinite_steps += 1
        self.streak["rolled_back"] = True
        return False

    def record(self, stepped: bool, step: int, global_step: int, renders_finite: bool,
               nonfinite_losses: Sequence[str]) -> bool:
        """Account one generator step; True when the streak of skipped ones reaches the limit."""
        if stepped:
            self.consecutive, self.streak = 0, {}
            return False
        if self.consecutive == 0:
            self.streak = {"start": step, "global_step": global_step,
                           "rolled_back": self.streak.get("rolled_back", False)}
        self.consecutive += 1
        self.streak["renders_finite"] = bool(renders_finite)
        self.streak["nonfinite_losses"] = list(nonfinite_losses)
        return self.consecutive >= self.max_consecutive

    def diagnose(self, optimizer: torch.optim.Optimizer, auxiliary: torch.optim.Optimizer | None,
                 names: Mapping[int, str]) -> str:
        """What this process can see that makes every step non-finite, most specific first.
        ``names``: parameter id -> name."""
        causes: list[str] = []
        params = [p for g in optimizer.param_groups for p in g["params"]]
        bad_w = next((names.get(id(p), "?") for p in params if not bool(torch.isfinite(p).all())), None)
        if bad_w:
            causes.append(f"non-finite weights ({bad_w})")
        aux = [p for g in auxiliary.param_groups for p in g["params"]] if auxiliary is not None else []
        bad_aux = next((names.get(id(p), "?") for p in aux if not bool(torch.isfinite(p).all())), None)
        if bad_aux:
            causes.append(f"non-finite weights of the guidance's own model ({bad_aux})")
        for p in params:
            for k, v in optimizer.state.get(p, {}).items():
                if not (isinstance(v, Tensor) and v.is_floating_point() and v.numel() > 1):
                    continue
                if not bool(torch.isfinite(v).all()):
                    causes.append(f"non-finite optimizer state ({k} of {names.get(id(p), '?')})")
                elif k == "exp_avg_sq" and bool((v < 0).any()):
                    causes.append(f"corrupt optimizer state (negative {k} of {names.get(id(p), '?')})")
                if len(causes) > 2:
                    break
        if self.streak.get("rolled_back"):
            causes.append("the optimizer step turned finite weights non-finite (rolled back)")
        lr = max(float(g["lr"]) for g in optimizer.param_groups)
        if not math.isfinite(lr) or lr > 1.0:
            causes.append(f"lr={lr:g} is implausibly large (system.optimizer.lr / lr_scale / group_lr)")
        w = [(float(p.detach().abs().max()), names.get(id(p), "?")) for p in params if p.numel()]
        wmax, wname = max(w) if w else (0.0, "")
        if math.isfinite(wmax) and wmax > 1e6:
            causes.append(f"weights have blown up (max |w| = {wmax:.3g} in {wname})")
        if not causes:
            bad = self.streak.get("nonfinite_losses") or []
            if not self.streak.get("renders_finite", True):
                causes.append("renders are non-finite although weights and optimizer state are finite")
            elif bad:
                causes.append(f"the prior / guidance output is non-finite (loss {', '.join(bad)}) although weights "
                              f"and renders are finite: check the prior (its weights or reference renders)")
            else:
                causes.append("non-finite gradients with finite losses and weights")
        return "; ".join(causes)


def last_good_checkpoint(dirpath: str | None, good_step: int, resumed_from: str | None, streak_start: int) -> str:
    """The newest ``step_N.ckpt`` in ``dirpath`` with N <= ``good_step`` (written before the streak)."""
    found = []
    if dirpath and Path(dirpath).is_dir():
        for path in Path(dirpath).glob("*.ckpt"):
            m = re.fullmatch(r"step_(\d+)", path.stem)
            if m and int(m.group(1)) <= good_step:
                found.append((int(m.group(1)), str(path)))
    if found:
        return max(found)[1]
    return f"{resumed_from} (the checkpoint this run resumed from)" if resumed_from else \
        f"none (no checkpoint was written before step {streak_start})"


def uncount_lightning_step(trainer) -> None:
    """Take one optimizer step back out of Lightning's count, after it was rolled back.

    Under manual optimisation Lightning's ``global_step`` is the number of ``LightningOptimizer.step``
    calls (``optim_step_progress.total.completed``), counted as the call happens. A rolled-back
    step is no update, so it must not count, and there is no public way to say so: stepping the
    raw torch optimizer instead would bypass the strategy and precision plugin (AMP scaling,
    DeepSpeed). So the counters of that one call are decremented here, and only here.
    """
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    for tracker in (progress.total, progress.current):
        tracker.completed -= 1
        tracker.ready -= 1
