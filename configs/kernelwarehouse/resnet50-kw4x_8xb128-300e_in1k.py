# ResNet-50 + KernelWarehouse (4x): the 1x cells, four times as many;
# 102,015,144 parameters.
_base_ = './resnet50-kw1x_8xb128-300e_in1k.py'

model = dict(backbone=dict(kw_cfg=dict(cell_num_ratio=4)))
