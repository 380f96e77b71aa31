"""IMSE Lab: test-time adaptation of Vision Transformers by their spectral experts (IMSE, ICLR 2026)."""

__version__ = "0.1.0"
