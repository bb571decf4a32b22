# One-stage: stock ATSS (FPN P3-P7, extra convs on the outputs) with DDF-Up
# in the top-down path.
_base_ = 'mmdet::atss/atss_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    neck=dict(type='DDFUpFPN', upsample_cfg=dict(type='ddf_up', guided=True)))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
