"""Evaluation: lm-eval tasks and scoring, perplexity, accuracy recovery, the code sandbox."""
