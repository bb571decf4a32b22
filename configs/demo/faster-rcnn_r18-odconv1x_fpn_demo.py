# ./faster-rcnn_r18_fpn_demo.py with an OD-ResNet-18 backbone (ODConv 1x,
# r=1/16, both 3x3 convs of every BasicBlock), trained from scratch. The
# temperature anneals 30 -> 1 over the first 2 of the 10 demo epochs (the
# ImageNet recipe anneals over the first 10 of 100).
_base_ = './faster-rcnn_r18_fpn_demo.py'

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
        init_cfg=None))

custom_hooks = [dict(type='DynamicTemperatureHook', epochs=2)]
