"""Versioned prompt templates and their loader."""
