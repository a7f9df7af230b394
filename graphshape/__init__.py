"""graphshape: Deep Kernel Shaping and Tailored Activation Transformations as a graph pass.

``import graphshape`` is cheap: it imports neither torch nor onnx. The numeric core,
``graphshape.kernels``, needs numpy and scipy only. The pipeline entry points
(``load``, ``to_torch``, ``to_onnx``, ``analyze``, ``shape``, ``shape_onnx``) import
their frameworks when first used.
"""

from graphshape.errors import GraphshapeError

__version__ = "0.1.0"

# name -> (module, attribute); resolved on first access so that importing the package
# (or graphshape.kernels) never pulls in torch or onnx.
_LAZY = {
    "Graph": ("graphshape.ir", "Graph"),
    "Node": ("graphshape.ir", "Node"),
    "load": ("graphshape.api", "load"),
    "to_torch": ("graphshape.api", "to_torch"),
    "to_onnx": ("graphshape.api", "to_onnx"),
    "analyze": ("graphshape.api", "analyze"),
    "shape": ("graphshape.api", "shape"),
    "shape_onnx": ("graphshape.api", "shape_onnx"),
}

__all__ = ["GraphshapeError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graphshape' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
