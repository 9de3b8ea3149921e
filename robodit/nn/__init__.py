"""robodit.nn."""
