"""p3s: prompt processing for detector data quality monitoring."""

__version__ = "0.1.0"
