"""Image folders → Ray Data decode → VGG16 features → Parquet → Ray Train → Keras models → predictions."""
