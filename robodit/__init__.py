"""robodit: Transformer diffusion policies for robot manipulation."""

__version__ = "0.1.0"


def load_policy(path, device="cpu", ema=True):
    """Rebuild a ready-to-run policy from a checkpoint directory (no training code involved), or load a directory
    written by `robodit export` (ONNX Runtime / AOTInductor) behind the same predict_action."""
    from robodit.training.checkpoint import load_policy as _load

    return _load(path, device=device, ema=ema)


__all__ = ["load_policy", "__version__"]
