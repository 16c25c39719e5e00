"""Text encoders (prompt -> pooled embedding) and the on-disk embedding cache."""
from amortized3d.text.analytic import BagOfWordsTextEncoder
from amortized3d.text.base import TextEncoder
from amortized3d.text.cache import EmbeddingCache, cache_key

__all__ = ["BagOfWordsTextEncoder", "EmbeddingCache", "TextEncoder", "cache_key"]
