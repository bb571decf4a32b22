# ./faster-rcnn_r18_fpn_demo.py with a KW-ResNet-18 backbone
# (KernelWarehouse 1x, 4 warehouses), trained from scratch. tau anneals
# 1 -> 0 over the first 2 of the 10 demo epochs.
_base_ = './faster-rcnn_r18_fpn_demo.py'

custom_imports = dict(
    imports=['mmpretrain.models', 'mmdyn.models', 'mmdyn.engine'],
    allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.KWResNet',
        depth=18,
        kw_cfg=dict(cell_num_ratio=1),
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None))

custom_hooks = [dict(type='DynamicTemperatureHook', epochs=2)]
