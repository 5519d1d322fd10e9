"""Image bytes to arrays: decoding with its limits, resampling, augmentation."""
