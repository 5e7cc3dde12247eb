"""util layer (see docs/architecture.md, "Layers")."""
