"""The data set doctor: duplicates and leakage, likely wrong labels and strays, found from the feature shards."""
