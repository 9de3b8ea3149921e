"""robodit.policies."""
