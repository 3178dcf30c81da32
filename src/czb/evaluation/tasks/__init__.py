"""Tasks, one module each; importing a module registers its task."""
