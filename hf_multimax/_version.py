"""The installed version of hf-multimax."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hf-multimax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
