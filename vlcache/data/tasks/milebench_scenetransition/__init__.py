"""Package data (listed so that setuptools ships it)."""
