"""Chart evidence ranking and the similar-case index (no network I/O here)."""
