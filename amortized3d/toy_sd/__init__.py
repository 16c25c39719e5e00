"""A toy Stable Diffusion of the primitives world, trained here (issue 14).

config.py (what determines it, hashed), tokenizer.py (CLIP BPE over the world's words), data.py
(reference renders, captions, the exact latent denoiser), train.py (VAE, then UNet + text encoder;
``save_pretrained`` in SD-2.1's layout), cache.py (built once per config), quality.py (its own quality).
"""
