"""The networks: VGG16 and its weights, the three models, model files, numeric precision."""
