"""Family module: not implemented yet (nothing registered)."""
