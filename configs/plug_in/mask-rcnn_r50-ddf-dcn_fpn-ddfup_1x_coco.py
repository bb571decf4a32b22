# Stock ResNet's dcn= slot with DDF (the DDF module as the Bottleneck 3x3
# conv of stages 3-4; DDF needs in_channels == out_channels, which the
# Bottleneck 3x3 has) plus DDF-Up in the FPN, in a stock Mask R-CNN.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dcn=dict(type='DDFConv2d', fallback_on_stride=False),
        stage_with_dcn=(False, False, True, True)),
    neck=dict(type='DDFUpFPN', upsample_cfg=dict(type='ddf_up', guided=True)))

# Stock ImageNet weights: the new DDF layers start from their init.
allow_partial_load = 'static_weights'

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
