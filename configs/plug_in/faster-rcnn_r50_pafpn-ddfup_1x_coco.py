# PAFPN: its upsampling is hard-wired in mmdet's PAFPN, so the neck type
# changes to mmdyn's DDFUpPAFPN (same arguments, layers and bottom-up path,
# DDF-Up in the top-down path).
_base_ = 'mmdet::pafpn/faster-rcnn_r50_pafpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    neck=dict(
        type='DDFUpPAFPN', upsample_cfg=dict(type='ddf_up', guided=True)))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
