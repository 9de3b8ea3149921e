"""`dit` — the plain baseline: a DiT denoiser over action tokens, AdaLN-Zero noise conditioning,
cross-attention to observation tokens."""

from robodit.policies.dit.modeling import DiTPolicy

__all__ = ["DiTPolicy"]
