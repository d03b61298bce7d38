"""Small shared helpers: object references, logging quiet-down, tree paths, XLA flags."""
