"""The cache format: `open_cache(dir)` is the reader API (docs/architecture.md, section 9)."""

from pipeline.cache.reader import Cache, open_cache

__all__ = ["Cache", "open_cache"]
