# ResNet-50 + KernelWarehouse (1x): every Bottleneck conv except stage 0's
# first 1x1, and the three stride-2 shortcuts, are KW convs (4 warehouses,
# cells 64x64 .. 512x512); the stride-1 stage-0 shortcut stays plain.
# 28,052,310 parameters. Same recipe as ResNet-18 KW (drop path 0.1).
_base_ = './resnet18-kw1x_8xb128-300e_in1k.py'

model = dict(backbone=dict(depth=50), head=dict(in_channels=2048))
