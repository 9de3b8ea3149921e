"""robodit.evaluation."""
