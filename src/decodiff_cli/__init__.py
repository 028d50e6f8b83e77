"""decodiff: visual anomaly detection and localisation with DeCo-Diff.

The public API is ``Detector`` (imported lazily, so ``decodiff --help`` stays fast)::

    from decodiff_cli import Detector
    detector = Detector.load("model/")
"""

__version__ = "0.3.0"
__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in ("Detector", "Prediction"):
        from decodiff_cli import detector

        return getattr(detector, name)
    raise AttributeError(name)
