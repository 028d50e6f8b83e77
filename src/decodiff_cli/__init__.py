"""decodiff: visual anomaly detection and localisation with DeCo-Diff."""

__version__ = "0.1.0"
