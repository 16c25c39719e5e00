"""The VSD family encodes each step's renders through the VAE once (issue 13: it was twice)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from amortized3d.benchmark_steps import make_step_runner
from amortized3d.guidance.base import Guidance
from amortized3d.build import build_system
from conftest import compose
from sd_helpers import sd_overrides

STEPS = 2


def _old_encode(self, inp):
    """3125a41: forward encoded with grad, the score loss re-encoded under no_grad."""
    if inp.rgb.requires_grad:
        return self.prior.encode(inp.rgb)
    with torch.no_grad():
        return self.prior.encode(inp.rgb)


def _train(tmp_path, cache_dir, tiny_sd, guidance: str):
    """(VAE encoder calls, logged losses per step, final trainable state) of STEPS real training steps."""
    cfg = compose(tmp_path, cache_dir, *sd_overrides(tiny_sd, f"guidance={guidance}", "logger=none"), tiny=False)
    L.seed_everything(cfg.seed, workers=True)
    system = build_system(cfg)[0]
    calls = []
    system.guidance.prior.vae.encoder.register_forward_hook(lambda *a: calls.append(system.batch_index))
    losses = []
    original = system.log_dict

    def log_dict(logs, **kw):
        losses.append({k: v.detach().clone() for k, v in logs.items()
                       if k.startswith(("loss/", "aux/loss", "train/loss")) and isinstance(v, torch.Tensor)})
        return original(logs, **kw)

    system.log_dict = log_dict
    run = make_step_runner(system, cfg, steps_per_call=STEPS - 1)  # the runner trains one step more
    run()
    state = {k: v.detach().clone() for k, v in system.state_dict().items()
             if isinstance(v, torch.Tensor) and not system._is_frozen(k)}
    return calls, losses, state


@pytest.mark.parametrize("guidance", ["vsd", "lvsd", "l2vsd"])
def test_one_vae_encode_per_step_and_the_same_training(tmp_path, cache_dir, tiny_sd, guidance, monkeypatch):
    calls, losses, state = _train(tmp_path / "new", cache_dir, tiny_sd, guidance)
    assert calls == list(range(STEPS)), f"VAE encoder calls by step: {calls}"  # once per step
    monkeypatch.setattr(Guidance, "encode", _old_encode)
    old_calls, old_losses, old_state = _train(tmp_path / "old", cache_dir, tiny_sd, guidance)
    assert len(old_calls) == 2 * STEPS  # what it was
    assert len(losses) == len(old_losses) == STEPS and set(losses[0]) == set(old_losses[0])
    for new, old in zip(losses, old_losses):  # bit-identical losses ...
        for k in new:
            assert torch.equal(new[k], old[k]), k
    assert set(state) == set(old_state)
    for k in state:  # ... and so bit-identical gradients: the same parameters after every update
        assert torch.equal(state[k], old_state[k]), k
