"""mixerhub: Mixer's adapter model beside Envoy."""

__version__ = "0.1.0"
