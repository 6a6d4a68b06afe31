"""The fastunlearn command line: one module per command."""
