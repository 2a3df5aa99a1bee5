"""Built-in recurrent cells."""
