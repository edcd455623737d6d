"""linmix.models (filled by later issues)."""
