"""Luthien Control: an AI-control proxy for OpenAI-compatible APIs."""

__version__ = "0.1.0"
