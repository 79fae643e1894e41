"""Labeling by people: the terminal session (`hitl label`) and its local journal."""
