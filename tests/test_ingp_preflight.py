"""Issue 15 item 5: the per-prompt iNGP estimates its training memory and refuses before allocating."""
from __future__ import annotations

import pytest

from amortized3d.generators.ingp import (TRAINING_BYTES_PER_PARAMETER, IngpGenerator, IngpTooLargeError,
                                         check_fits, parameters_per_prompt, training_bytes)

SMALL = {"n_levels": 4, "log2_hashmap_size": 12, "base_resolution": 4, "implementation": "torch"}


def test_the_estimate_is_the_real_parameter_count():
    gen = IngpGenerator(5, SMALL, mlp_hidden=16)
    assert sum(p.numel() for p in gen.parameters()) == 5 * parameters_per_prompt(SMALL, 16)
    assert training_bytes(5, SMALL, 16) == 5 * parameters_per_prompt(SMALL, 16) * TRAINING_BYTES_PER_PARAMETER


def test_the_paper_encoding_at_415_prompts_is_refused_with_bytes_needed_and_available(monkeypatch):
    import amortized3d.generators.ingp as ingp

    monkeypatch.setattr(ingp, "available_bytes", lambda: (64 * 2**30, "host MemAvailable"))
    with pytest.raises(IngpTooLargeError) as err:
        IngpGenerator(415, {"implementation": "torch"})  # the paper's 16 x 2^19 grid: ~97 GiB to train
    msg = str(err.value)
    assert "needs 97.4 GiB" in msg and "only 64.0 GiB are available (host MemAvailable)" in msg
    assert "at most 272 prompts fit" in msg


def test_a_run_that_fits_is_not_refused_and_the_check_can_be_switched_off():
    assert check_fits(2, SMALL, 16, available=(10**9, "test")) == training_bytes(2, SMALL, 16)
    with pytest.raises(IngpTooLargeError):
        check_fits(2, SMALL, 16, available=(1000, "test"))
    IngpGenerator(2, SMALL, mlp_hidden=16, check_memory=False)
