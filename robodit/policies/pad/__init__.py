"""`pad` — Prediction with Action: one DiT jointly denoises future frames and the action chunk, so action-free
video trains the same network (the action loss is masked for it)."""

from robodit.policies.pad.modeling import PADPolicy

__all__ = ["PADPolicy"]
