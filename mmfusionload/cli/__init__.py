"""The command line (``mmfusionload``, ``python -m mmfusionload``): commands, rendering,
config building and stand-ins for dry runs."""
from .commands import main

__all__ = ['main']
