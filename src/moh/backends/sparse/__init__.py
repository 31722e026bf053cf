"""The sparse backend: work only for the (token, head) pairs the router selected."""
from moh.backends.sparse import backend  # noqa: F401  (registers "sparse")
