"""linmix.tasks (filled by later issues)."""
