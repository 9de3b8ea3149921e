"""`rdt` — Robotics Diffusion Transformer: one denoiser over the unified 128-d action space (any embodiment with
an adapter in robodit.action_space), alternating language / observation cross-attention. Trains on one
store or on several robots' stores at once (`dataset.paths=[...]`, robodit.datasets.multi); the weights do not
depend on the store count, so a multi-robot checkpoint fine-tunes on one store with `train.init_from`."""

from robodit.policies.rdt.modeling import SIZES, RDTPolicy

__all__ = ["SIZES", "RDTPolicy"]
