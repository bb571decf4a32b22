"""Dataset utilities: the built-in demo data generator."""
