"""moegen — Mixture-of-Experts layers generated from a spec, from Python.

    import moegen
    layer = moegen.Layer("specs/mixtral-8x7b.yaml")      # a path, YAML text or a dict
    layer.describe()                                     # sizes, dtype, variant, the weights it reads
    layer.bind(router_w=..., w1=..., w2=...)             # torch tensors, kept referenced
    y, stats = layer.forward(x)

    from moegen.torch import MoE                         # an nn.Module with autograd (needs torch)

Every failure of the library raises moegen.Error (status, status_name, message); bad tensors raise
TypeError or ValueError naming the tensor.
"""
from . import _C


class Error(RuntimeError):
    """A moegen status other than MOEGEN_OK: `status` (the negative code), `status_name`
    ("MOEGEN_ERR_SPEC", ...) and the library's message (file:line:col for spec errors)."""

    def __init__(self, status, status_name, message):
        super().__init__(f"{status_name}: {message}")
        self.status = status
        self.status_name = status_name
        self.message = message


_C.set_error_class(Error)

from .layer import Layer, spec_text  # noqa: E402

__version__ = _C.version()
__all__ = ["Error", "Layer", "spec_text", "__version__"]
