from .atomic_checkpoint_hook import (AtomicCheckpointHook,
                                     register_as_default_checkpoint_hook)
from .exact_resume_hook import ExactResumeHook
from .temperature_hook import DynamicTemperatureHook

__all__ = [
    'AtomicCheckpointHook', 'DynamicTemperatureHook', 'ExactResumeHook',
    'register_as_default_checkpoint_hook'
]
