"""Small utilities shared by every script; the name is kept because reference pickles import it."""

from .util import EasyDict, make_cache_dir_path  # noqa: F401
