# ResNet-18 + KernelWarehouse (2x): the 1x cells, twice as many of them;
# 23,242,127 parameters.
_base_ = './resnet18-kw1x_8xb128-300e_in1k.py'

model = dict(backbone=dict(kw_cfg=dict(cell_num_ratio=2)))
