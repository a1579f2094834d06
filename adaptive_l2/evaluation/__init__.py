"""Evaluation pieces: k-reciprocal re-ranking without a GPU (`rerank`) and the adversarial
robustness of a model, clean and under metric attacks (`robustness`)."""
