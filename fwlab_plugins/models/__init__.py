"""The built-in models that are not a cell in the generic sequence model."""
