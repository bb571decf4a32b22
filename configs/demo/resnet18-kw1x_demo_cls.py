# ResNet-18 + KernelWarehouse (1x: 4 warehouses, one per stage) on the
# synthetic demo classification data, same schedule as resnet18_demo_cls.py;
# the KW temperature falls 1 -> 0 over the first 10 of the 30 epochs. (Over
# one epoch, training stalled at chance: at tau = 0 the attention gradients
# of a from-scratch KW network are large (stem grad norm 35-430 vs ~2 for
# the static ResNet-18), and the official recipe has 20 warm-up epochs.)
_base_ = './resnet18_demo_cls.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='KWResNet',
        kw_cfg=dict(
            reduction=1 / 16,
            cell_num_ratio=1,
            cell_inplane_ratio=1,
            cell_outplane_ratio=1)))

custom_hooks = [dict(type='DynamicTemperatureHook', epochs=10)]
