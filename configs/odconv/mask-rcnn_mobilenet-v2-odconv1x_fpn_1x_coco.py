# Mask R-CNN 1x + FPN with OD-MobileNetV2 (1.0, ODConv 1x); backbone as in
# ./faster-rcnn_mobilenet-v2-odconv1x_fpn_1x_coco.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmpretrain.models', 'mmdyn.models', 'mmdyn.engine'],
    allow_failed_imports=False)

pretrained = 'work_dirs/mobilenet-v2-odconv1x_8xb32_in1k/epoch_150.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.DynamicMobileNetV2',
        widen_factor=1.0,
        dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625),
        out_indices=(1, 2, 4, 7),
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=[24, 32, 96, 1280]))

custom_hooks = [dict(type='DynamicTemperatureHook', start=1.0, end=1.0)]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
