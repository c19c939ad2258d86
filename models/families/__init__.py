"""The five paper model families (PyTorch definitions; training, export and tests).

One module per family; :mod:`models.families.backbones` holds the
convolutional trunks they share. Serving never imports this package: it
runs the exported ONNX graphs through :mod:`models.backend`.
"""
