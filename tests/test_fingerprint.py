"""One weight fingerprint (amortized3d/fingerprint.py) behind every weights-keyed cache."""
from __future__ import annotations

import torch

from amortized3d.fingerprint import BOUNDARY_BYTES, files_fingerprint, tensors_fingerprint


def test_files_fingerprint_follows_names_sizes_and_boundary_bytes(tmp_path):
    weights = tmp_path / "unet"
    weights.mkdir()
    blob = bytearray(3 * BOUNDARY_BYTES)
    (weights / "model.safetensors").write_bytes(bytes(blob))
    (weights / "config.json").write_text("{}")
    base = files_fingerprint(weights)
    assert base == files_fingerprint(weights) and len(base) == 16
    for where in (0, len(blob) - 1):  # a re-saved file differs at its header or its end
        changed = bytearray(blob)
        changed[where] ^= 1
        (weights / "model.safetensors").write_bytes(bytes(changed))
        assert files_fingerprint(weights) != base
    (weights / "model.safetensors").write_bytes(bytes(blob))
    (weights / "config.json").rename(weights / "other.json")
    assert files_fingerprint(weights) != base
    single = files_fingerprint(weights / "model.safetensors")  # one weights file (the evaluation CLIP's)
    assert single == files_fingerprint(weights / "model.safetensors") and single != base


def test_tensors_fingerprint_follows_every_value_dtype_and_name():
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.zeros(3), "empty": torch.zeros(0)}
    base = tensors_fingerprint(state)
    assert base == tensors_fingerprint({k: v.clone() for k, v in state.items()}) and len(base) == 16
    nudged = {**state, "a.bias": torch.tensor([0.0, 0.0, 1e-30])}
    assert tensors_fingerprint(nudged) != base
    assert tensors_fingerprint({**state, "a.weight": state["a.weight"].double()}) != base
    assert tensors_fingerprint({**state, "a.weight": state["a.weight"].reshape(3, 2)}) != base
    assert tensors_fingerprint({"b.weight" if k == "a.weight" else k: v for k, v in state.items()}) != base
    assert tensors_fingerprint({"w": torch.ones(2, dtype=torch.bfloat16)}) != tensors_fingerprint(
        {"w": torch.ones(2, dtype=torch.float16)})


def test_the_text_encoder_and_the_sd_prior_key_their_caches_by_it(tiny_sd):
    from amortized3d.priors.stable_diffusion import StableDiffusionPrior
    from amortized3d.text.clip import CLIPTextEncoder

    identity = CLIPTextEncoder(str(tiny_sd), local_files_only=True).identity
    assert identity.endswith(f"-{files_fingerprint(tiny_sd / 'text_encoder')}-{files_fingerprint(tiny_sd / 'tokenizer')}")
    prior = StableDiffusionPrior(str(tiny_sd), vae_resolution=16, local_files_only=True)
    assert prior.vae_digest() == tensors_fingerprint(prior.vae.state_dict())
