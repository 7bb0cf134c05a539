"""tritonkit: hand-written Triton kernels for a conv net's training step.

``tritonkit.runtime`` is imported first: it decides, before any kernel is decorated, whether kernels
run compiled on a GPU or in Triton's interpreter. Importing tritonkit registers every
``torch.ops.tritonkit.*`` custom op and its autograd.
"""

from tritonkit.runtime import runtime_info  # noqa: I001  (must run before kernels are imported)
from tritonkit import ops, autograd, functional, nn, optim  # noqa: F401
from tritonkit.lowering import backend, explain  # noqa: F401  (torch.compile(model, backend=tritonkit.backend))

__version__ = "0.1.0"
__all__ = ["runtime_info", "ops", "autograd", "functional", "nn", "optim", "backend", "explain", "__version__"]
