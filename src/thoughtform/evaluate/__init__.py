"""Evaluations of voiced generation (``thoughtform eval ...``)."""
