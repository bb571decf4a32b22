# Stock ResNeXt's dcn= slot: ODConv as the grouped (32 groups) 3x3 conv of
# every Bottleneck in stages 2-4. (DDFConv2d cannot go here: its
# groups must be 1 or in_channels.)
_base_ = 'mmdet::faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py'

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
