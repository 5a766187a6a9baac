"""llm-energy-sidecar: per-request GPU energy and carbon for LLM inference servers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llm-energy-sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
