"""robodit.datasets."""
