# Faster R-CNN 1x + FPN, OD-MobileNetV2 (1.0) with ODConv 4x.
_base_ = './faster-rcnn_mobilenet-v2-odconv1x_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        dyconv_cfg=dict(kernel_num=4),
        init_cfg=dict(checkpoint='work_dirs/mobilenet-v2-odconv4x_8xb32_in1k/'
                      'epoch_150.pth')))
