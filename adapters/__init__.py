"""Built-in adapters, one folder each. Importable as mixerhub.adapters.<name>."""
