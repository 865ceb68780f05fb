"""Data and ranges: data sources for evaluation and calibration, statistics, range methods, caches."""
