# KW-MobileNetV2 x0.5, kw4x: 4,648,587 parameters (label smoothing 0.1).
_base_ = './mobilenet-v2-kw4x_8xb32_in1k.py'

model = dict(backbone=dict(widen_factor=0.5))
