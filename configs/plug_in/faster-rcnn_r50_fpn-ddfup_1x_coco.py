# Two-stage: stock Faster R-CNN with DDF-Up in the FPN's top-down path
# (guided by the lateral feature each step merges into).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    neck=dict(type='DDFUpFPN', upsample_cfg=dict(type='ddf_up', guided=True)))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
