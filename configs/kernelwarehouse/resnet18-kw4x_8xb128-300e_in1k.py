# ResNet-18 + KernelWarehouse (4x): the 1x cells, four times as many;
# 45,862,085 parameters.
_base_ = './resnet18-kw1x_8xb128-300e_in1k.py'

model = dict(backbone=dict(kw_cfg=dict(cell_num_ratio=4)))
