# ./mask-rcnn_r18_fpn_demo.py with an OD-ResNet-18 backbone (ODConv 1x), the
# DDF-Up FPN and DDF-Up in the mask head, trained from scratch (temperature
# 30 -> 1 over the first 2 epochs).
_base_ = './mask-rcnn_r18_fpn_demo.py'

custom_imports = dict(
    imports=['mmpretrain.models', 'mmdyn.models', 'mmdyn.engine'],
    allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.DynamicResNet',
        depth=18,
        dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625),
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(type='DDFUpFPN', upsample_cfg=dict(type='ddf_up', guided=True)),
    roi_head=dict(
        mask_head=dict(
            type='DDFUpFCNMaskHead',
            upsample_cfg=dict(type='ddf_up', scale_factor=2))))

custom_hooks = [dict(type='DynamicTemperatureHook', epochs=2)]
