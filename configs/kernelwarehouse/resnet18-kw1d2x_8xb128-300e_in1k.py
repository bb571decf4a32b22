# ResNet-18 + KernelWarehouse (1/2x): cells of half the 1x channels (32x32 ..
# 256x256), half the mixtures' cell count; no drop path; 7,431,044 parameters.
_base_ = './resnet18-kw1x_8xb128-300e_in1k.py'

model = dict(
    backbone=dict(
        drop_path_rate=0.0,
        kw_cfg=dict(
            cell_num_ratio=1 / 2,
            cell_inplane_ratio=1 / 2,
            cell_outplane_ratio=1 / 2)))
