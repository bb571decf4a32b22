# NAS-FPN: its merge cells upsample with a hard-wired interpolation, so the
# neck type changes to mmdyn's DDFUpNASFPN: DDF-Up (unguided) in the three
# upsampling merges of each stage (P6->P4 x4, P4->P3 x2, P7->P6 x2).
_base_ = 'mmdet::nas_fpn/retinanet_r50_nasfpn_crop640-50e_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(neck=dict(type='DDFUpNASFPN', upsample_cfg=dict(type='ddf_up')))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
