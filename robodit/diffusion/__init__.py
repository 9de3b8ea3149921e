"""robodit.diffusion."""
