# KW-MobileNetV2 x0.5, kw1d2x: 1,466,888 parameters.
_base_ = './mobilenet-v2-kw1d2x_8xb32_in1k.py'

model = dict(backbone=dict(widen_factor=0.5))
