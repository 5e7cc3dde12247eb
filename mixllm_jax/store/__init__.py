"""store layer (see docs/architecture.md, "Layers")."""
