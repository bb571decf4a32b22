# Copyright (c) mmdyn contributors. All rights reserved.
"""Convert an official OSVAI/ODConv checkpoint to mmdyn.

od_resnet18/50/101 and od_mobilenetv2_050/075/100, any kernel number, as
the official ``main.py`` saves them (``state_dict`` with ``module.`` keys
beside ``epoch``, ``best_acc``, ``optimizer``) or as a plain state dict.

    python tools/model_converters/odconv2mmdyn.py IN OUT [--config CONFIG]
        [--weights {auto,model,ema}] [--verify] [--trust-checkpoint]

The keys are renamed to mmdyn's ImageClassifier layout (backbone.*,
head.fc.*) and checked against the model of CONFIG (default: the one mmdyn
config the checkpoint fits exactly); a mismatch is refused naming the first
mismatching key with both shapes, and nothing is written. ``--verify``
prints the top-5 logits and checksums of a fixed input (README.md, "Model
zoo"). OUT is an mmengine checkpoint (``load_from`` or
``init_cfg=dict(type='Pretrained')``).
"""
from mmdyn.analysis.converter_args import converter_parser

if __name__ == '__main__':
    # --help and usage errors answer before torch and mmengine are imported
    converter_parser(__doc__.splitlines()[0]).parse_args()
    import mmdyn.compat
    from mmdyn.analysis.converters import converter_cli
    mmdyn.compat.apply()  # see docs/compat.md
    converter_cli('odconv', __doc__.splitlines()[0])
