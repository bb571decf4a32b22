"""Importing this package registers mmdyn's hooks in mmengine's root
``HOOKS`` (and ``CPUAmpOptimWrapper`` in ``OPTIM_WRAPPERS``) and applies the
checkpoint-loading and packaging compatibility fixes (see
:mod:`mmdyn.engine.compat` and :mod:`mmdyn.engine.checkpoint`), and makes
checkpoint saves atomic and hashed (:mod:`mmdyn.engine.checkpoint_io`,
:class:`~mmdyn.engine.hooks.AtomicCheckpointHook`)."""
from .compat import apply_compat_fixes

# Before anything else: Config.fromfile of 'mmdet::' bases needs the fix.
apply_compat_fixes()
from . import config_bases, dcn_slot  # noqa: F401,E402  (mmdyn:: bases, overlays; dcn= checks)

from .amp import CPUAmpOptimWrapper  # noqa: E402
from .checkpoint import (CheckpointLoadError, CheckpointShapeCheckHook,  # noqa: E402,E501
                         patch_resume_lookup, register_local_loader)
from .checkpoint_io import patch_checkpoint_saving  # noqa: E402
from .hooks import *  # noqa: F401,F403,E402
from .malloc import tune_malloc  # noqa: E402
from .sanity import (EmptyDatasetCheckHook,  # noqa: E402
                     patch_empty_dataset_error)

register_local_loader()
# Atomic, hashed checkpoint files; 'CheckpointHook' builds
# AtomicCheckpointHook; a clear error for an empty last_checkpoint and for
# a dataset that ends up with no samples.
patch_checkpoint_saving()
register_as_default_checkpoint_hook()  # noqa: F405
patch_resume_lookup()
patch_empty_dataset_error()
