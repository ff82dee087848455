"""devicegate: a reverse-proxy gateway that enforces policy per device."""

__version__ = "0.1.0"
