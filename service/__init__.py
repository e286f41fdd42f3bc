"""scm-relay: relays SCM-change events from Kafka to the Scantrust async SCM upload API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scm-relay")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
