"""MDT's auxiliary heads: Masked Generative Foresight (MGF) and Contrastive Latent Alignment (CLA).

MGF makes the goal-conditioned encoder's tokens carry what the scene will look like a few steps ahead: a small
transformer sees those tokens plus the 25% visible patches of the future frame and must paint the other 75%.
CLA pulls the goal token's encoding under a language goal towards its encoding under the image goal of the same
sample, against other goals placed in the same observation, so the few language-labelled episodes anchor language
in the space the many image-goal episodes train.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from robodit.nn.attention import TransformerEncoderBlock, make_norm
from robodit.nn.encoders import images_to_float
from robodit.policies.base import keep_in_graph


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


class ContrastiveAlignment(nn.Module):
    """Symmetric InfoNCE between a sample's goal token under its language goal and under its image goal, where
    every candidate shares the anchor's observation (CLIP-style, learned temperature).

    Why not pool the whole encoder output (the first version): both views of a sample carry the same observation
    tokens and different samples carry different ones, so the observation alone tells the positive from the
    negatives and the loss fell to ~1e-5 in a few hundred steps without aligning any goal. Here the encoder is run
    on every (observation i, goal j) pair of the labelled samples, and anchor i's candidates are the goals j
    *in observation i*: the only thing that differs between them is the goal, so the loss can fall only as far as
    the language and image goals agree.

    Inputs are the encoder's goal-token outputs on that grid, row = observation, column = goal:
    lang [K, K, D] under language goals, image [K, K, D] under image goals; `same_goal` [K, K] bool marks pairs
    that name the same goal (same task or instruction): such a j ≠ i is not a negative and leaves the softmax.
    Rows without any negative contribute nothing; with none at all the loss is an exact 0 that still reaches
    every parameter (DDP needs a gradient for each)."""

    def __init__(self, dim: int, temperature: float = 0.07):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"CLA temperature must be > 0, got {temperature}")
        self.proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints of the pooled CLA (`pool.query`, `pool.attn.*`, `pool.proj.*`) still load: the pool only
        served training, so its projection becomes this one and the rest is dropped."""
        for key in [k for k in state_dict if k.startswith(prefix + "pool.")]:
            value = state_dict.pop(key)
            if key.startswith(prefix + "pool.proj."):
                state_dict.setdefault(prefix + key[len(prefix + "pool."):], value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, lang: torch.Tensor, image: torch.Tensor, same_goal: torch.Tensor) -> torch.Tensor:
        l2i, i2l = self.directional_losses(lang, image, same_goal)
        return 0.5 * (l2i + i2l)

    def directional_losses(self, lang: torch.Tensor, image: torch.Tensor,
                           same_goal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(language anchor vs image goals, image anchor vs language goals), each a mean cross-entropy over the
        anchors that have a negative; both exact zeros in the graph when none has."""
        k = lang.shape[0]
        if lang.shape[:2] != (k, k) or image.shape != lang.shape or same_goal.shape != (k, k):
            raise ValueError(f"CLA expects lang and image goal tokens [K, K, D] and same_goal [K, K]; got "
                             f"{tuple(lang.shape)}, {tuple(image.shape)}, {tuple(same_goal.shape)}")
        zl = F.normalize(self.proj(lang).float(), dim=-1)
        zi = F.normalize(self.proj(image).float(), dim=-1)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        eye = torch.eye(k, dtype=torch.bool, device=lang.device)
        excluded = same_goal.to(lang.device).bool() & ~eye
        rows = (~excluded & ~eye).any(dim=1)  # anchors with at least one negative
        if not rows.any():
            zero = keep_in_graph((zl.sum() + zi.sum()) * 0.0, self.parameters())
            return zero, zero
        diag = lambda z: z.diagonal(dim1=0, dim2=1).T  # z[i, i]: sample i under its own goal, [K, D]
        # language anchor i against image goals j, all in observation i; and image anchor against language goals
        l2i = scale * torch.einsum("id,ijd->ij", diag(zl), zi)
        i2l = scale * torch.einsum("id,ijd->ij", diag(zi), zl)
        labels = torch.arange(k, device=lang.device)[rows]
        ce = lambda logits: F.cross_entropy(logits.masked_fill(excluded, float("-inf"))[rows], labels)
        return ce(l2i), ce(i2l)
