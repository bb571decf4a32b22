"""Importing this package registers mmdyn's hooks in mmengine's root
``HOOKS`` (and ``CPUAmpOptimWrapper`` in ``OPTIM_WRAPPERS``) and applies the
checkpoint-loading and packaging compatibility fixes (see
:mod:`mmdyn.engine.compat` and :mod:`mmdyn.engine.checkpoint`)."""
from .compat import apply_compat_fixes

# Before anything else: Config.fromfile of 'mmdet::' bases needs the fix.
apply_compat_fixes()
from . import config_bases, dcn_slot  # noqa: F401,E402  (mmdyn:: bases, overlays; dcn= checks)

from .amp import CPUAmpOptimWrapper  # noqa: E402
from .checkpoint import (CheckpointLoadError, CheckpointShapeCheckHook,  # noqa: E402,E501
                         register_local_loader)
from .hooks import *  # noqa: F401,F403,E402
from .malloc import tune_malloc  # noqa: E402
from .sanity import EmptyDatasetCheckHook  # noqa: E402

register_local_loader()
