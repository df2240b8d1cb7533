"""Training, evaluation and checkpoint plumbing."""
