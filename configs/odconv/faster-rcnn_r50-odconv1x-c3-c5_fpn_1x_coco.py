# Plug-in example in the style of mmdet's DCN configs: stock mmdet ResNet-50
# (torchvision ImageNet weights) whose Bottleneck 3x3 convs of stages c3-c5
# are ODConv2d (1x), built through ResNet's `dcn` hook. The ODConv layers
# start from their own initialisation, like DCN layers do.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dcn=dict(type='ODConv2d', kernel_num=1, reduction=0.0625),
        stage_with_dcn=(False, True, True, True)))

custom_hooks = [dict(type='DynamicTemperatureHook', start=1.0, end=1.0)]

# Stock ImageNet weights: the new ODConv layers start from their init.
allow_partial_load = 'static_weights'

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
