"""Convert an official OSVAI/KernelWarehouse KW-ResNet checkpoint to mmdyn.

kw_resnet18/50, any budget (the config is found by the warehouse shapes).

    python tools/model_converters/kw2mmdyn.py IN OUT [--config CONFIG]

The keys are renamed to mmdyn's ImageClassifier layout (backbone.*,
head.fc.*) and checked against the model of CONFIG (default: the one mmdyn
config the checkpoint fits exactly); unknown keys, missing keys and shape
mismatches are refused with a list of them. OUT is an mmengine checkpoint
(load it with ``load_from`` or ``init_cfg=dict(type='Pretrained')``).
"""
from mmdyn.analysis.converters import converter_cli

if __name__ == '__main__':
    converter_cli('kw', __doc__.splitlines()[0])
