# Copyright (c) mmdyn contributors. All rights reserved.
"""Importing this package registers every mmdyn layer, backbone, neck and
head into the OpenMMLab registries (layers: mmengine root ``MODELS``;
backbones: ``mmpretrain.registry.MODELS``; necks and heads:
``mmdet.registry.MODELS``)."""
from . import layers  # noqa: F401
from .backbones import *  # noqa: F401,F403
from .heads import *  # noqa: F401,F403
from .necks import *  # noqa: F401,F403
