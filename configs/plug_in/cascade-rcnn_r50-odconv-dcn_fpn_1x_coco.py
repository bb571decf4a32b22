# Stock ResNet's dcn= slot: ODConv (1x) as the 3x3 conv of every
# Bottleneck in stages 2-4 of a stock Cascade R-CNN. The slot needs a
# Bottleneck ResNet (depth 50+); the paper's backbone with every block conv
# dynamic is mmpretrain.DynamicResNet (configs/odconv/).
_base_ = 'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dcn=dict(type='ODConv2d', kernel_num=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))

# Stock ImageNet weights: the new ODConv layers start from their init.
allow_partial_load = 'static_weights'

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
