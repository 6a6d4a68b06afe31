"""Model architectures and the transforms the engine applies to them."""
