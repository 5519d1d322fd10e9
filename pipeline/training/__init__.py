"""Ray Train: the training loop, the three training jobs, their reports and tracking."""
