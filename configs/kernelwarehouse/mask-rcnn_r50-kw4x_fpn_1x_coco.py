# Mask R-CNN 1x + FPN, KW-ResNet-50 with KernelWarehouse 4x
# (cell_num_ratio=4); same recipe as ./mask-rcnn_r50-kw1x_fpn_1x_coco.py.
_base_ = './mask-rcnn_r50-kw1x_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        kw_cfg=dict(cell_num_ratio=4),
        init_cfg=dict(checkpoint='work_dirs/resnet50-kw4x_8xb128-300e_in1k/'
                      'epoch_300.pth')))
