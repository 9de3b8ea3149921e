"""`mdt` — Multimodal Diffusion Transformer: one policy for language or goal-image goals, trained on sparsely
labelled demonstrations with Masked Generative Foresight and Contrastive Latent Alignment."""

from robodit.policies.mdt.modeling import MDTPolicy

__all__ = ["MDTPolicy"]
