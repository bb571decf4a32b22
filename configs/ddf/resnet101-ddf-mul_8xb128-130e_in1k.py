# DDF-ResNet-101 (combine='mul'); same recipe as DDF-ResNet-50.
_base_ = './resnet50-ddf-mul_8xb128-130e_in1k.py'

model = dict(backbone=dict(depth=101))
