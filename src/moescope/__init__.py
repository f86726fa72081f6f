"""moescope: see what a Mixture-of-Experts model really does."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
