"""data/: the CS224N files, tokenisation and batching."""
