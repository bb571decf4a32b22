# Cascade instance segmentation: stock Cascade Mask R-CNN with DDF-Up in
# the FPN and in the mask head of each of the three stages.
_base_ = 'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    neck=dict(type='DDFUpFPN', upsample_cfg=dict(type='ddf_up', guided=True)),
    # One mask head config, built for each stage (as the stock config).
    roi_head=dict(
        mask_head=dict(
            type='DDFUpFCNMaskHead',
            upsample_cfg=dict(type='ddf_up', scale_factor=2))))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
