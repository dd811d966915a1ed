"""pestle."""
