"""Configuration shipped with mixerhub.

default/ is what `mixerhub serve` runs; examples/ shows more.
"""
