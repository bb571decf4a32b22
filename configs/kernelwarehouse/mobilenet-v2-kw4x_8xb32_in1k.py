# KW-MobileNetV2 x1.0, kw4x: 4x cells, sharing (layer) gives 19 warehouses;
# 11,379,382 parameters. Same recipe as kw1x (label smoothing 0.1).
_base_ = './mobilenet-v2-kw1x_8xb32_in1k.py'

model = dict(backbone=dict(cell_num_ratio=4, sharing_range=('layer', )))
