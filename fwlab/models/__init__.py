"""Models that ship with the framework itself (not tied to one paper)."""
