"""Row-sparse parameters: a gather with a row-sparse gradient, and the lazy Adam that applies it.

A parameter with a leading instance dimension [P, ...] (the per-prompt iNGP's hash tables and
stacked MLP weights: one row per prompt and particle) is touched by a step only in the rows of its
batch. :func:`gather_rows` hands the forward those rows as a small working set and gives the
parameter a sparse COO gradient over them (``torch.sparse_coo_tensor``, as ``nn.Embedding(sparse=True)``
does), so no [P, ...] gradient is ever allocated. :class:`LazyAdam` then updates only the rows a
gradient names, each row with its own step count, so that row r's t-th update is exactly the t-th
update of an Adam that saw only row r's gradients (Kingma & Ba 2015, Alg. 1, per row r):

    t_r <- t_r + 1
    m_r <- beta1 m_r + (1 - beta1) g_r                 (torch: m.lerp_(g, 1 - beta1))
    v_r <- beta2 v_r + (1 - beta2) g_r^2
    theta_r <- theta_r - lr / (1 - beta1^t_r) * m_r / (sqrt(v_r) / sqrt(1 - beta2^t_r) + eps)

ProlificDreamer / DreamFusion optimise every prompt on its own; dense Adam over all P rows would
instead move rows that are not in the batch (their stale momentum) and bias-correct every row with
the global step. Rows not in a step's gradient keep their weights, moments and step count.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import Tensor


class _GatherRows(torch.autograd.Function):
    """out = param[rows] (``rows`` unique and sorted); d param = sparse COO over ``rows``."""

    @staticmethod
    def forward(ctx, param: Tensor, rows: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.shape = param.shape
        return param.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        sparse = torch.sparse_coo_tensor(rows[None], grad.contiguous(), ctx.shape, is_coalesced=True,
                                         check_invariants=False)  # rows are unique and sorted: coalesced
        return sparse, None


def gather_rows(param: Tensor, rows: Tensor) -> Tensor:
    """``param[rows]`` [U, ...] for unique sorted ``rows`` [U]; its gradient reaches ``param`` row-sparse."""
    if rows.dim() != 1:
        raise ValueError(f"rows must be [U], got {tuple(rows.shape)}")
    return _GatherRows.apply(param, rows.long())


def touched_rows(grad: Tensor) -> Tensor | None:
    """The rows a gradient touches (sorted, unique), or None for a dense gradient (every row)."""
    if not grad.is_sparse:
        return None
    return (grad if grad.is_coalesced() else grad.coalesce()).indices()[0]


def gradient_values(grad: Tensor) -> Tensor:
    """The stored values of a gradient: its dense tensor, or a sparse one's non-zero rows."""
    return grad._values() if grad.is_sparse else grad


def _rows_view(t: Tensor) -> Tensor:
    """[P, ...] -> [P, D] (a 0-dim tensor is one row of one element)."""
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(t.shape[0], -1)


class LazyAdam(torch.optim.Optimizer):
    """Adam (or AdamW, ``decoupled_weight_decay``) over rows, with a step count per row.

    Dense gradients touch every row; sparse COO gradients (:func:`gather_rows`) only theirs. State
    per parameter: ``exp_avg``, ``exp_avg_sq`` (like torch.optim.Adam) and ``step``, an int64 vector
    [P] of per-row update counts (torch.optim.Adam's is a scalar: a dense checkpoint is converted on
    load, see :meth:`load_state_dict`). Weight decay as torch does it, on the touched rows only:
    L2 (``g + wd * theta``, Adam) or decoupled (``theta * (1 - lr * wd)``, AdamW). The update of
    rows that share a step count uses torch.optim.Adam's own expressions (python-float bias
    corrections, ``addcdiv_``), so when every row is touched every step it equals torch's Adam.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False) -> None:
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"LazyAdam: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LazyAdam: betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=bool(decoupled_weight_decay)))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(_rows_view(p).shape[0], dtype=torch.int64, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device != p.device:  # torch keeps "step" where the checkpoint had it
            state["step"] = state["step"].to(p.device)
        if not p.is_contiguous():  # the row views below must alias the parameter
            raise ValueError(f"LazyAdam updates contiguous parameters in place; got strides {p.stride()}")
        grad, rows = p.grad, None
        if grad.is_sparse:
            grad = grad if grad.is_coalesced() else grad.coalesce()  # duplicate rows summed
            rows, grad = grad.indices()[0], grad.values()
        grad = _rows_view(grad)
        weight, m, v = _rows_view(p), _rows_view(state["exp_avg"]), _rows_view(state["exp_avg_sq"])
        if rows is None:  # every row, in place
            w_rows, m_rows, v_rows, steps = weight, m, v, state["step"]
            steps += 1
        else:  # the touched rows' working copies, written back below
            w_rows, m_rows, v_rows = weight[rows], m[rows], v[rows]
            state["step"][rows] += 1
            steps = state["step"][rows]
        if wd != 0:
            if group["decoupled_weight_decay"]:
                w_rows.mul_(1 - lr * wd)
            else:
                grad = grad.add(w_rows, alpha=wd)
        m_rows.lerp_(grad, 1 - beta1)
        v_rows.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        distinct = torch.unique(steps).tolist()
        for t in distinct:  # rows with step count t: torch.optim.Adam's update, with its scalars
            sel = None if len(distinct) == 1 else (steps == t).nonzero().flatten()
            bias_correction1 = 1 - beta1**t
            bias_correction2_sqrt = (1 - beta2**t) ** 0.5
            step_size = lr / bias_correction1
            if sel is None:
                denom = (v_rows.sqrt() / bias_correction2_sqrt).add_(eps)
                w_rows.addcdiv_(m_rows, denom, value=-step_size)
            else:
                denom = (v_rows[sel].sqrt() / bias_correction2_sqrt).add_(eps)
                w_rows.index_copy_(0, sel, w_rows[sel].addcdiv_(m_rows[sel], denom, value=-step_size))
        if rows is not None:
            weight.index_copy_(0, rows, w_rows)
            m.index_copy_(0, rows, m_rows)
            v.index_copy_(0, rows, v_rows)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load; a dense torch.optim.Adam state (scalar ``step``: every row updated that often) is
        converted, with a warning, to per-row counts."""
        super().load_state_dict(state_dict)
        converted = 0
        for p, state in self.state.items():
            step = state.get("step")
            if isinstance(step, Tensor) and step.dim() == 0:
                state["step"] = torch.full((_rows_view(p).shape[0],), int(step.item()), dtype=torch.int64,
                                           device=p.device)
                converted += 1
        if converted:
            warnings.warn(f"LazyAdam: converted {converted} dense Adam state(s) to per-row step counts (every row "
                          "counts the dense run's steps; its moments continue as they are)", RuntimeWarning,
                          stacklevel=2)


def has_row_steps(optimizer_state: dict) -> bool:
    """Whether a serialized optimizer state holds LazyAdam's per-row step counts (a vector ``step``)."""
    return any(isinstance(s, dict) and isinstance(s.get("step"), Tensor) and s["step"].dim() == 1
               for s in optimizer_state.get("state", {}).values())
