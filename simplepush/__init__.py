"""simplepush: a SimplePush server on Tornado."""

__version__ = "0.1.0"
