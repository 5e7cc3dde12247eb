"""offline layer (see docs/architecture.md, "Layers")."""
