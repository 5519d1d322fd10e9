"""HTTP serving of a trained model: the server, request parsing and limits, authentication."""
