# MobileNetV2 (0.5x) + ODConv (4x, r=1/16).
_base_ = './mobilenet-v2-w0.5-odconv1x_8xb32_in1k.py'

model = dict(backbone=dict(dyconv_cfg=dict(kernel_num=4)))
