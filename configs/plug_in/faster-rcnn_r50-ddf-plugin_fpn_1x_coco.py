# Stock ResNet's plugins=: an extra DDF layer after the 3x3 conv (and its
# BN + ReLU) of every Bottleneck in stage 4. A plugin adds a layer, it does
# not replace one; plugins are built with in_channels only, so the layer's
# out_channels (the stage's width, 512 in stage 4) is given here.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(plugins=[
        dict(
            cfg=dict(type='DDFConv2d', out_channels=512, kernel_size=3),
            stages=(False, False, False, True),
            position='after_conv2')
    ]))

# Stock ImageNet weights: the new DDF layers start from their init.
allow_partial_load = 'static_weights'

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
