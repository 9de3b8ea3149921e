"""`mode` — Mixture of Denoising Experts: a decoder-only transformer whose FFNs are noise-routed SwiGLU experts,
fused into one dense MLP per (step, layer) at inference (the expert cache)."""

from robodit.policies.mode.modeling import SIZES, MoDEPolicy

__all__ = ["MoDEPolicy", "SIZES"]
