"""Built-in handlers, served by short name: ``connserver serve echo``."""
