# Stock ResNet's dcn= slot: DyConv (4 kernels, softmax attention) as the
# Bottleneck 3x3 conv in stages 2-4 of a stock RetinaNet.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dcn=dict(type='DyConv2d', kernel_num=4, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
# DyConv's temperature: 30 -> 1 over the first 10 epochs.
custom_hooks = [dict(type='DynamicTemperatureHook')]

# Stock ImageNet weights: the new DyConv layers start from their init.
allow_partial_load = 'static_weights'

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
