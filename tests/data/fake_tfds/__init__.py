"""Tiny TFDS builders that pack local image files (tests only; no network)."""
