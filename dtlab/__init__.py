"""dtlab."""
