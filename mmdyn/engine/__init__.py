"""Importing this package registers mmdyn's hooks in mmengine's root
``HOOKS`` and applies the checkpoint-loading compatibility fixes."""
from .hooks import *  # noqa: F401,F403
