# DDF-ResNet-50 with the spatial and channel filters added (combine='add');
# same recipe as the 'mul' model.
_base_ = './resnet50-ddf-mul_8xb128-130e_in1k.py'

model = dict(backbone=dict(combine='add'))
