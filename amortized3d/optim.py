"""Optimizer construction from config and the gradient sanity check used before every step."""
from __future__ import annotations

from typing import Any

import torch

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def build_optimizer(groups: list[dict], config: dict[str, Any]) -> torch.optim.Optimizer:
    """``config``: {name, lr, betas?, eps?, weight_decay?, group_lr: {group name: lr}}.

    Groups carry a "name"; ``group_lr`` overrides the lr of named groups (e.g. the hash grid).
    """
    config = dict(config)
    name = config.pop("name", "adam")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    group_lr = dict(config.pop("group_lr", None) or {})
    groups = [dict(g) for g in groups]
    for g in groups:
        if g.get("name") in group_lr:
            g["lr"] = float(group_lr.pop(g["name"]))
    if group_lr:
        raise ValueError(f"optimizer.group_lr names unknown parameter groups {sorted(group_lr)}; "
                         f"valid: {[g.get('name') for g in groups]}")
    if "betas" in config:
        config["betas"] = tuple(config["betas"])
    return OPTIMIZERS[name](groups, **config)


def grads_are_finite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
