"""Evaluation pieces: re-ranking without a GPU."""
