"""Exports of the store; the formats live in `services.feedback.formats`."""

from services.feedback.formats import export_lines

__all__ = ["export_lines"]
