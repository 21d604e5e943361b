"""Run shell commands from a notebook in real, limited, observable Linux containers."""

__version__ = "0.1.0"
