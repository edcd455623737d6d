"""linmix.train (filled by later issues)."""
