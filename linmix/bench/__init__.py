"""linmix.bench (filled by later issues)."""
