# Copyright (c) mmdyn contributors. All rights reserved.
"""Convert a DyConv checkpoint of kaijieshi7/Dynamic-convolution-Pytorch.

The common unofficial DyConv code (``dy_resnet18/50``: every block conv and
the downsample 1x1 are ``Dynamic_conv2d``) has no official release; a model
trained with it and saved with ``torch.save(model.state_dict(), ...)`` (or
inside a training checkpoint) converts to the configs in configs/dyconv.

    python tools/model_converters/dyconv2mmdyn.py IN OUT [--config CONFIG]
        [--weights {auto,model,ema}] [--verify] [--trust-checkpoint]

Its temperature is a plain attribute, not saved: the converted model uses
the inference value T = 1 (the value the code reaches after training).
"""
from mmdyn.analysis.converter_args import converter_parser

if __name__ == '__main__':
    # --help and usage errors answer before torch and mmengine are imported
    converter_parser(__doc__.splitlines()[0]).parse_args()
    import mmdyn.compat
    from mmdyn.analysis.converters import converter_cli
    mmdyn.compat.apply()  # see docs/compat.md
    converter_cli('dyconv', __doc__.splitlines()[0])
