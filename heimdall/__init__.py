"""Heimdall: transmitter localization from WebSDR IQ recordings."""

__version__ = "0.1.0"
