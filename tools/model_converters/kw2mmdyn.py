# Copyright (c) mmdyn contributors. All rights reserved.
"""Convert an official OSVAI/KernelWarehouse checkpoint to mmdyn.

kw_resnet18/50 (every budget), kw_mobilenetv2_050/100 (1x, 4x),
kw1d2x_mobilenetv2_050/100 (with its KW classifier) and kw_convnext_tiny,
as the official ``main.py`` saves them (``model``, ``model_ema``,
``optimizer``, ``epoch``, ``scaler``, ``args``) or as a plain state dict.
The config is found by the warehouse shapes.

    python tools/model_converters/kw2mmdyn.py IN OUT [--config CONFIG]
        [--weights {auto,model,ema}] [--verify] [--trust-checkpoint]

The keys are renamed to mmdyn's ImageClassifier layout (backbone.*,
head.*) and checked against the model of CONFIG; a mismatch is refused
naming the first mismatching key with both shapes, and nothing is written.
``--weights ema`` converts the EMA weights of a checkpoint trained with
``--model_ema``. ``--verify`` prints the top-5 logits and checksums of a
fixed input (README.md, "Model zoo").
"""
from mmdyn.analysis.converter_args import converter_parser

if __name__ == '__main__':
    # --help and usage errors answer before torch and mmengine are imported
    converter_parser(__doc__.splitlines()[0]).parse_args()
    import mmdyn.compat
    from mmdyn.analysis.converters import converter_cli
    mmdyn.compat.apply()  # see docs/compat.md
    converter_cli('kw', __doc__.splitlines()[0])
