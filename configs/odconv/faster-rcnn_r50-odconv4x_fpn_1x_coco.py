# Faster R-CNN 1x + FPN, OD-ResNet-50 with ODConv 4x (kernel_num=4).
_base_ = './faster-rcnn_r50-odconv1x_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        dyconv_cfg=dict(kernel_num=4),
        init_cfg=dict(checkpoint='work_dirs/resnet50-odconv4x_8xb32_in1k/'
                      'epoch_100.pth')))
