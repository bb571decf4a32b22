# Mask R-CNN 1x + FPN with KW-MobileNetV2 (1.0, kw1x, sharing (layer,
# pwconv)); stride-4/8/16/32 maps (24, 32, 96, 1280 channels), i.e.
# out_indices (1, 2, 4, 7). Same recipe as ./mask-rcnn_r50-kw1x_fpn_1x_coco.py.
_base_ = './mask-rcnn_r50-kw1x_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.KWMobileNetV2',
        widen_factor=1.0,
        cell_num_ratio=1,
        sharing_range=('layer', 'pwconv'),
        out_indices=(1, 2, 4, 7),
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='work_dirs/mobilenet-v2-kw1x_8xb32_in1k/epoch_150.pth',
            prefix='backbone.')),
    neck=dict(in_channels=[24, 32, 96, 1280]))
