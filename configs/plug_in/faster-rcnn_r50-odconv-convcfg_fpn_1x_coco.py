# Stock ResNet's conv_cfg: every conv of the backbone (stem 7x7, the 1x1s
# and 3x3s of the blocks, the shortcut 1x1s) becomes ODConv. Use dcn= to
# convert only the 3x3s. (conv_cfg=DDFConv2d cannot work: the 1x1s change
# the channel count.)
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(backbone=dict(conv_cfg=dict(type='ODConv2d', kernel_num=1)))

# Stock ImageNet weights: the new ODConv layers start from their init.
allow_partial_load = 'static_weights'

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
