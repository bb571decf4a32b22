# Copyright (c) mmdyn contributors. All rights reserved.
from .atomic_checkpoint_hook import AtomicCheckpointHook
from .exact_resume_hook import ExactResumeHook
from .temperature_hook import DynamicTemperatureHook

__all__ = ['AtomicCheckpointHook', 'DynamicTemperatureHook', 'ExactResumeHook']
