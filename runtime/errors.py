"""HmoeError: the one error type users see (defined in shm/errors.py, the lowest layer; re-exported here)."""

from hmoe.shm.errors import HmoeError

__all__ = ["HmoeError"]
