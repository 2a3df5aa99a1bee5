"""Built-in datamodules."""
