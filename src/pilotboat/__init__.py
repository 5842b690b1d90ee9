"""Pilotboat: device onboarding server."""

__version__ = "0.1.0"
