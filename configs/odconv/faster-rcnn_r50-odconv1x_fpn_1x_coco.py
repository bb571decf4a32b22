# Faster R-CNN 1x + FPN with the OD-ResNet-50 backbone (ODConv 1x, r=1/16:
# every Bottleneck conv is ODConv2d), as in the ODConv paper's COCO runs:
# norm_eval, frozen stem + stage 1 (DDP without find_unused_parameters:
# every other parameter gets a gradient). The backbone
# starts from an ImageNet checkpoint of ./resnet50-odconv1x_8xb32_in1k.py.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmpretrain.models', 'mmdyn.models', 'mmdyn.engine'],
    allow_failed_imports=False)

pretrained = 'work_dirs/resnet50-odconv1x_8xb32_in1k/epoch_100.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.DynamicResNet',
        depth=50,
        dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625),
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.')))

# Fine-tuning keeps the inference temperature (T=1, as the official
# detection backbone's init_weights sets it): no annealing.
custom_hooks = [dict(type='DynamicTemperatureHook', start=1.0, end=1.0)]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
