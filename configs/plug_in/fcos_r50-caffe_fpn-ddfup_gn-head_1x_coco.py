# One-stage, anchor-free, extra levels from the outputs: stock FCOS (FPN
# P3-P7 with add_extra_convs='on_output', relu_before_extra_convs) with
# DDF-Up in the top-down path.
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    neck=dict(type='DDFUpFPN', upsample_cfg=dict(type='ddf_up', guided=True)))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
