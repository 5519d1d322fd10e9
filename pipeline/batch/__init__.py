"""Ray Data batch jobs: the cluster's plan, decode and inference over many files, feature extraction, prediction."""
