"""The annotation side."""
