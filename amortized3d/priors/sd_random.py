"""A randomly initialised Stable Diffusion in the diffusers layout, built from config (tiny by default).

Why: no weights can be downloaded on development/CI machines, but the real loading code
(``from_pretrained`` by subfolder) must still be exercised: the tests build their SD with this,
the benchmarks (``benchmark_sd``'s tiny size, ``bench_cache_size``) their models of a given width.
This writes the same five subfolders a real SD-2.1 snapshot has (unet, vae, scheduler,
text_encoder, tokenizer), with the same component classes, at toy sizes. The tokenizer is a byte-level CLIP BPE whose vocab
and merges files are written here (bytes, bytes + "</w>", a few merges, the two specials).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_MERGES = [("c", "u"), ("r", "e</w>"), ("b", "e"), ("t", "h"), ("a", "l"), ("al", "l</w>")]


def byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            out.append(256 + extra)
            extra += 1
    return [chr(c) for c in out]


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a byte-level CLIP BPE; returns their paths."""
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(tokens))}))
    merges.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    return vocab, merges


def build_tiny_sd(directory: str | Path, hidden: int = 32, unet_channels: tuple[int, ...] = (8, 16),
                  vae_channels: tuple[int, ...] = (8,), prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny SD (diffusers layout) to ``directory`` and return it."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(directory)
    vocab, merges = write_tokenizer_files(root / "tokenizer_src")
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                              projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    CLIPTextModel(text_cfg).save_pretrained(root / "text_encoder")
    n = len(unet_channels)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (n - 1),
        up_block_types=("UpBlock2D",) * (n - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=hidden, attention_head_dim=2, norm_num_groups=4).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
                  down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                  up_block_types=("UpDecoderBlock2D",) * len(vae_channels), norm_num_groups=4,
                  sample_size=16).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                  prediction_type=prediction_type).save_pretrained(root / "scheduler")
    return root
