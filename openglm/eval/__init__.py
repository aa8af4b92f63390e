"""Evaluation: perplexity (per token and bits per character) and zero-shot multiple choice."""
