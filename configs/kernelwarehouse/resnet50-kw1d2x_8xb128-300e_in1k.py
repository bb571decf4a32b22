# ResNet-50 + KernelWarehouse (1/2x): half-channel cells, half the cell count,
# and the non-local basis attention (each layer predicts its own cells plus a
# 1/16 basis of the others'); 17,638,264 parameters.
_base_ = './resnet50-kw1x_8xb128-300e_in1k.py'

model = dict(
    backbone=dict(
        kw_cfg=dict(
            cell_num_ratio=1 / 2,
            cell_inplane_ratio=1 / 2,
            cell_outplane_ratio=1 / 2,
            nonlocal_basis_ratio=1 / 16)))
