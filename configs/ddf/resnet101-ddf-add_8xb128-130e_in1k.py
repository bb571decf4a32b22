# DDF-ResNet-101 (combine='add'); same recipe as DDF-ResNet-50.
_base_ = './resnet101-ddf-mul_8xb128-130e_in1k.py'

model = dict(backbone=dict(combine='add'))
