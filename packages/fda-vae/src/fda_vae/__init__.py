"""fda-vae."""

__version__ = "0.1.0"
