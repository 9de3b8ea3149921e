"""`rdt` — Robotics Diffusion Transformer: one denoiser over the unified 128-d action space (any embodiment with
an adapter in robodit.envs.action_space), alternating language / observation cross-attention."""

from robodit.policies.rdt.modeling import SIZES, RDTPolicy

__all__ = ["SIZES", "RDTPolicy"]
