# Mask R-CNN 1x, ResNet-50 + DDF-Up FPN (guided, as in
# ./faster-rcnn_r50_fpn-ddfup_1x_coco.py) and DDF-Up in the mask head in
# place of its x2 deconvolution.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    neck=dict(type='DDFUpFPN', upsample_cfg=dict(type='ddf_up', guided=True)),
    roi_head=dict(
        mask_head=dict(
            type='DDFUpFCNMaskHead',
            upsample_cfg=dict(type='ddf_up', scale_factor=2))))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
