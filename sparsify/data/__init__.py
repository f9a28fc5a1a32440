"""Training and evaluation data: the pretraining corpus (mix, dedup, split, pack) and the downstream tasks."""
