"""linmix.layers (filled by later issues)."""
