# Mask R-CNN 1x + FPN with KW-MobileNetV2 (1.0, kw4x: cell_num_ratio 4,
# sharing (layer)).
_base_ = './mask-rcnn_mobilenet-v2-kw1x_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        cell_num_ratio=4,
        sharing_range=('layer', ),
        init_cfg=dict(checkpoint='work_dirs/mobilenet-v2-kw4x_8xb32_in1k/'
                      'epoch_150.pth')))
