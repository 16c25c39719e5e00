"""Building blocks of the 3DConv-net (CC3D's 3D StyleGAN2 generator, as used by ScaleDreamer).

    z [B,Z] -> normalise -> MLP (lrelu) -> concat pooled text [B,E] -> FC -> w [B,W]
    learned const [C4, 4,4,4] -> (modulated 3x3x3 conv -> ToFeatures) -> per block:
        conv0 (modulated 3x3x3 at the input resolution, then x2 trilinear upsample)
        [+ learned per-voxel bias for resolutions <= const_bias_resolution]
        conv1 (modulated 3x3x3) -> ToFeatures (1x1x1 modulated conv, no demodulation)
        skip: features = upsample(features) + ToFeatures(x)

Every conv layer adds a noise input (fixed per-layer noise volume times a learned strength
that starts at 0, StyleGAN's ``noise_mode="const"``), a bias, leaky ReLU with gain sqrt(2),
and clamps the result to +-``conv_clamp``. Every layer receives the same w (no style mixing,
as in the public code). All layers use the equalised learning rate (weights ~ N(0, 1), scaled
by 1/sqrt(fan_in) at run time), so one Adam lr fits every layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LRELU_GAIN = math.sqrt(2.0)


def normalize_2nd_moment(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale each row to unit mean square (StyleGAN's z normalisation)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def _interp_matrix(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[2n, n] linear interpolation with aligned corners: output i reads source i (n-1)/(2n-1)."""
    src = torch.arange(2 * n, device=device, dtype=torch.float64) * (n - 1) / (2 * n - 1)
    lo = src.floor().clamp(max=n - 1)
    frac = src - lo
    m = torch.zeros(2 * n, n, device=device, dtype=torch.float64)
    m[torch.arange(2 * n), lo.long()] += 1 - frac
    m[torch.arange(2 * n), (lo.long() + 1).clamp(max=n - 1)] += frac
    return m.to(dtype)


def upsample2(x: Tensor) -> Tensor:
    """x2 trilinear upsampling of [B,C,R,R,R] with aligned corners (as in the public code).

    Trilinear interpolation is separable, so it runs as three small matmuls, one per axis:
    ~5x faster than F.interpolate forward+backward on CPU, identical up to rounding (tested).
    """
    d, h, w = x.shape[-3:]
    x = torch.einsum("bcdhw,vw->bcdhv", x, _interp_matrix(w, x.device, x.dtype))
    x = torch.einsum("bcdhw,uh->bcduw", x, _interp_matrix(h, x.device, x.dtype))
    return torch.einsum("bcdhw,td->bcthw", x, _interp_matrix(d, x.device, x.dtype))


def channels_at(res: int, channel_base: int, channel_max: int, multiplier: int) -> int:
    """Channels of the block at ``res``: 512 up to 16^3, then halving per doubling (x multiplier).

    With the defaults (base 8192, max 512) this is the public table {4,8,16: 512, 32: 256m,
    64: 128m, 128: 64m, 256: 32m}.
    """
    return min(channel_max, channel_base * multiplier // res)


class EqualizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lrelu: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.gain = 1.0 / math.sqrt(in_features)
        self.lrelu = lrelu

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight * self.gain, self.bias)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.lrelu else x


def modulated_conv3d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True) -> Tensor:
    """Per-sample modulated 3D conv: x [B,I,D,H,W], weight [O,I,k,k,k], styles [B,I] -> [B,O,D,H,W].

    The B per-sample kernels run as ONE grouped convolution (groups = B); every reshape keeps
    the batch axis explicit, so sample b only ever meets kernel b (checked against a loop in
    the tests).
    """
    b, i = styles.shape
    o, _, k = weight.shape[:3]
    w = weight.unsqueeze(0) * styles.reshape(b, 1, i, 1, 1, 1)  # [B,O,I,k,k,k]
    if demodulate:
        w = w * (w.square().sum(dim=(2, 3, 4, 5), keepdim=True) + 1e-8).rsqrt()
    out = F.conv3d(x.reshape(1, b * i, *x.shape[2:]), w.reshape(b * o, i, k, k, k).to(x.dtype),
                   padding=k // 2, groups=b)
    return out.reshape(b, o, *out.shape[2:])


class SynthesisLayer(nn.Module):
    """Modulated (demodulated) 3x3x3 conv [-> x2 upsample] + noise + bias, lrelu, clamp."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, upsample: bool = False,
                 noise: bool = True, conv_clamp: float | None = 256.0):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.upsample, self.conv_clamp = upsample, conv_clamp
        if noise:  # the output resolution's fixed noise volume; its strength is learned from 0
            self.register_buffer("noise_const", torch.randn(resolution, resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros(()))
        else:
            self.noise_const = None

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        x = modulated_conv3d(x, self.weight, self.affine(w))
        if self.upsample:  # conv at the low resolution first: 8x cheaper than after upsampling
            x = upsample2(x)
        if self.noise_const is not None:
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        x = F.leaky_relu(x + self.bias.to(x.dtype).view(1, -1, 1, 1, 1), 0.2) * LRELU_GAIN
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp else x


class ToFeatures(nn.Module):
    """StyleGAN's ToRGB: a modulated 1x1x1 conv (no demodulation) to the output channels."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.gain = 1.0 / math.sqrt(in_ch)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        y = modulated_conv3d(x, self.weight, self.affine(w) * self.gain, demodulate=False)
        return y + self.bias.to(y.dtype).view(1, -1, 1, 1, 1)


class SynthesisBlock(nn.Module):
    """One x2 stage: (x [B,Ci,r^3], feats [B,C,r^3], w) -> (x [B,Co,(2r)^3], feats [B,C,(2r)^3])."""

    def __init__(self, in_ch: int, out_ch: int, out_features: int, w_dim: int, resolution: int,
                 const_bias: bool, noise: bool, conv_clamp: float | None):
        super().__init__()
        self.conv0 = SynthesisLayer(in_ch, out_ch, w_dim, resolution, True, noise, conv_clamp)
        self.conv1 = SynthesisLayer(out_ch, out_ch, w_dim, resolution, False, noise, conv_clamp)
        self.to_features = ToFeatures(out_ch, out_features, w_dim)
        self.const_bias = (nn.Parameter(torch.randn(out_ch, resolution, resolution, resolution) / math.sqrt(out_ch))
                           if const_bias else None)

    def forward(self, x: Tensor, feats: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv0(x, w)
        if self.const_bias is not None:
            x = x + self.const_bias.to(x.dtype)
        x = self.conv1(x, w)
        return x, upsample2(feats) + self.to_features(x, w)


class MappingNetwork(nn.Module):
    """z [B,Z] (+ text [B,E]) -> w [B,W]: normalised z through an lrelu MLP, concat text, one FC."""

    def __init__(self, z_dim: int, text_dim: int, w_dim: int, num_layers: int = 2, normalize_text: bool = True):
        super().__init__()
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList([EqualizedLinear(a, b, lrelu=True) for a, b in zip(dims[:-1], dims[1:])])
        self.embed = EqualizedLinear(dims[-1] + text_dim, w_dim)
        self.normalize_text = normalize_text

    def forward(self, z: Tensor, text: Tensor) -> Tensor:
        x = normalize_2nd_moment(z)
        for layer in self.layers:
            x = layer(x)
        # Why normalise the text too: a pooled CLIP (or bag-of-words) embedding has entries far
        # below 1, so next to the unit-scale z features it would barely move w at initialisation.
        t = normalize_2nd_moment(text) if self.normalize_text else text
        return self.embed(torch.cat([x, t.to(x.dtype)], dim=1))


class SynthesisNetwork(nn.Module):
    """w [B,W] -> feature volume [B, out_features, R, R, R] from a learned 4^3 constant."""

    def __init__(self, w_dim: int, resolution: int, out_features: int, channel_base: int = 8192,
                 channel_max: int = 512, channel_multiplier: int = 1, const_bias_resolution: int = 64,
                 noise: bool = True, conv_clamp: float | None = 256.0, gradient_checkpointing: bool = False):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
        res = [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]
        ch = {r: channels_at(r, channel_base, channel_max, channel_multiplier) for r in res}
        self.const = nn.Parameter(torch.randn(ch[4], 4, 4, 4))
        self.conv = SynthesisLayer(ch[4], ch[4], w_dim, 4, False, noise, conv_clamp)
        self.to_features = ToFeatures(ch[4], out_features, w_dim)
        self.blocks = nn.ModuleList([
            SynthesisBlock(ch[r // 2], ch[r], out_features, w_dim, r, r <= const_bias_resolution, noise, conv_clamp)
            for r in res[1:]])
        self.resolution, self.out_features = resolution, out_features
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, w: Tensor) -> Tensor:
        x = self.conv(self.const.unsqueeze(0).expand(w.shape[0], -1, -1, -1, -1), w)
        feats = self.to_features(x, w)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Recompute each block in backward: activations of the largest blocks dominate memory.
                x, feats = checkpoint(block, x, feats, w, use_reentrant=False)
            else:
                x, feats = block(x, feats, w)
        return feats
