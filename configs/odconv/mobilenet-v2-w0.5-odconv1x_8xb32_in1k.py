# MobileNetV2 (0.5x) + ODConv (1x, r=1/16). Channels are
# make_divisible(c * 0.5, 8); the final conv keeps 1280 channels.
_base_ = './mobilenet-v2-odconv1x_8xb32_in1k.py'

model = dict(backbone=dict(widen_factor=0.5))
