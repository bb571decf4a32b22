# Mask R-CNN 1x + FPN with DY-ResNet-50 (DyConv, K=4); backbone as in
# ./faster-rcnn_r50-dyconv4x_fpn_1x_coco.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmpretrain.models', 'mmdyn.models', 'mmdyn.engine'],
    allow_failed_imports=False)

pretrained = 'work_dirs/resnet50-dyconv4x_8xb32_in1k/epoch_100.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.DynamicResNet',
        depth=50,
        dyconv_cfg=dict(type='DyConv2d', kernel_num=4, ratio=0.25),
        dyconv_downsample=True,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.')))

custom_hooks = [dict(type='DynamicTemperatureHook', start=1.0, end=1.0)]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
