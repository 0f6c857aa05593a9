"""Inspection and reports: what the pass found in a model, as text, JSON and HTML."""
