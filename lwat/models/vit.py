"""A small Vision Transformer for 32x32 images (Dosovitskiy et al., ICLR 2021), pre-norm blocks with LayerNorm.

It has no BatchNorm, so `lwat.attach`'s default points are the patch embedding (a Conv) and every hidden Linear
(qkv, proj, fc1, fc2 of each block); to perturb after every LayerNorm instead, pass their names:
`points=[n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]`.
Parameter count for 10 classes, 3x32x32 input, default options: 141,898.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import cifar10_normalize


class Attention(nn.Module):
    """Multi-head self-attention with its own qkv and output Linears (so both can be perturbation points)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # (n, t, 3 * d) -> 3 x (n, heads, t, d / heads)
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """normalize -> patch embedding + learned positions -> blocks -> LayerNorm -> mean over tokens -> head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, patch_size: int, dim: int,
                 depth: int, heads: int, hidden: int):
        super().__init__()
        # Registered in execution order, so named_modules() order is forward order (points, depth).
        self.normalize = cifar10_normalize(in_channels)
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # the usual ViT init: truncated normal weights, zero biases
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(self.normalize(x)).flatten(2).transpose(1, 2) + self.pos  # (N, tokens, dim)
        return self.head(self.norm(self.blocks(x)).mean(1))


def vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, dim: int = 64,
        depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, width: float = 1.0) -> ViT:
    """A small ViT for images in [0, 1]: 4x4 patches (64 tokens at 32x32), no class token (mean pooling).

    Args:
        num_classes: outputs of the head.
        in_channels: 3 (RGB) or 1 (grayscale).
        image_size: H = W of the input images; a multiple of patch_size.
        patch_size: side of the square patches, in pixels.
        dim: token width at width 1.
        depth: number of transformer blocks.
        heads: attention heads; the token width is rounded to a multiple of it.
        mlp_ratio: hidden units of each block's MLP per token-width unit.
        width: multiplier of dim (like the CNNs' channel width, `lwat train --width`).

    Returns:
        The model; its LayerNorms are blocks.K.norm1, blocks.K.norm2 and norm (2 * depth + 1 of them).
    """
    if width <= 0:
        raise ValueError(f"vit: width must be positive, got {width}")
    if image_size % patch_size:
        raise ValueError(f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
    token_width = heads * max(1, round(dim * width / heads))
    return ViT(num_classes, in_channels, image_size, patch_size, token_width, depth, heads,
               max(1, round(token_width * mlp_ratio)))
