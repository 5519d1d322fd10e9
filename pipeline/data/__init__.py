"""Files in and out: storage (local paths and URIs), listing a data root, the ledger of an output folder, output ownership, the built-in data set."""
