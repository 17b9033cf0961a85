"""Models: the architecture table (arch) and loading by alias, GGUF, folder or hub id (loading)."""
