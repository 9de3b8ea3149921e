"""MDT's auxiliary heads: Masked Generative Foresight (MGF) and Contrastive Latent Alignment (CLA).

MGF makes the goal-conditioned encoder's tokens carry what the scene will look like a few steps ahead: a small
transformer sees those tokens plus the 25% visible patches of the future frame and must paint the other 75%.
CLA pulls the encoder's pooled output under a language goal towards its output under the image goal of the same
sample, so the few language-labelled episodes anchor language in the space the many image-goal episodes train.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from robodit.nn.attention import Attention, TransformerEncoderBlock, make_norm
from robodit.nn.encoders import images_to_float


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/p)(W/p), p·p·C]."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: torch.Tensor, patch: int, height: int, channels: int) -> torch.Tensor:
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=height // patch, p=patch, q=patch, c=channels)


def random_patch_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, P] bool, True = masked: exactly round(ratio·P) patches per sample, chosen uniformly."""
    n_mask = int(round(ratio * num_patches))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < n_mask


class MaskedForesight(nn.Module):
    """Reconstruct masked patches of the future frame of every camera (one mask shared by the cameras).

    Images arrive as uint8 or [-1, 1] floats [B, C, H, W]; the loss is the MSE on masked patches only, in
    [-1, 1] pixel units (the same scale the image encoder sees).
    """

    def __init__(self, image_keys: list[str], image_size: int, channels: int, context_dim: int, patch: int = 8,
                 width: int = 128, depth: int = 2, heads: int = 4, mask_ratio: float = 0.75):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"MGF: image size {image_size} is not divisible by the patch size {patch}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"MGF: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.image_keys, self.image_size, self.channels = list(image_keys), image_size, channels
        self.patch, self.mask_ratio = patch, mask_ratio
        self.num_patches = (image_size // patch) ** 2
        patch_dim = patch * patch * channels
        self.context_in = nn.Linear(context_dim, width)
        self.patch_in = nn.Linear(patch_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, width) * 0.02)
        self.camera = nn.Parameter(torch.randn(len(self.image_keys), 1, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerEncoderBlock(width, heads) for _ in range(depth))
        self.norm = make_norm("layernorm", width)
        self.head = nn.Linear(width, patch_dim)

    to_float = staticmethod(images_to_float)

    def forward(self, context: torch.Tensor, targets: dict[str, torch.Tensor],
                mask: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """context [B, N, Dc]; targets {key: [B, C, H, W]} → (loss, predicted patches [B, K, P, pd], mask [B, P])."""
        b = context.shape[0]
        if mask is None:
            mask = random_patch_mask(b, self.num_patches, self.mask_ratio, generator, context.device)
        target = torch.stack([patchify(self.to_float(targets[k]), self.patch) for k in self.image_keys], dim=1)
        tokens = self.patch_in(target.to(self.patch_in.weight.dtype))  # [B, K, P, W]
        tokens = torch.where(mask[:, None, :, None], self.mask_token.to(tokens.dtype), tokens)
        tokens = (tokens + self.pos + self.camera).flatten(1, 2)  # [B, K·P, W]
        x = torch.cat([self.context_in(context), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        pred = self.head(self.norm(x[:, context.shape[1]:])).unflatten(1, (len(self.image_keys), self.num_patches))
        err = (pred.float() - target).pow(2).mean(-1)  # [B, K, P]
        weight = mask[:, None, :].expand_as(err).float()
        loss = (err * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, pred, mask

    def compose(self, pred: torch.Tensor, targets: dict[str, torch.Tensor], mask: torch.Tensor) -> dict:
        """{key: (masked input, reconstruction with visible patches kept, target)} as [B, C, H, W] in [-1, 1]."""
        out = {}
        for i, key in enumerate(self.image_keys):
            real = patchify(self.to_float(targets[key]), self.patch)
            m = mask[..., None]
            masked = torch.where(m, torch.zeros_like(real), real)
            recon = torch.where(m, pred[:, i].float().clamp(-1, 1), real)
            out[key] = tuple(unpatchify(x, self.patch, self.image_size, self.channels) for x in (masked, recon, real))
        return out


class AttentionPool(nn.Module):
    """One learned query attends over the tokens: a pooled summary that can weigh the goal token as it likes."""

    def __init__(self, dim: int, heads: int, out_dim: int | None = None):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = Attention(dim, heads)
        self.proj = nn.Linear(dim, out_dim or dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(self.query.expand(tokens.shape[0], -1, -1), context=tokens)[:, 0])


class ContrastiveAlignment(nn.Module):
    """Symmetric InfoNCE between two views of the same samples with a learned temperature (CLIP-style)."""

    def __init__(self, dim: int, heads: int, temperature: float = 0.07):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"CLA temperature must be > 0, got {temperature}")
        self.pool = AttentionPool(dim, heads)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(self, tokens_a: torch.Tensor, tokens_b: torch.Tensor) -> torch.Tensor:
        za = F.normalize(self.pool(tokens_a).float(), dim=-1)
        zb = F.normalize(self.pool(tokens_b).float(), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * za @ zb.T
        labels = torch.arange(len(za), device=za.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
