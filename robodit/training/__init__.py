"""robodit.training."""
