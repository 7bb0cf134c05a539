"""tritonkit: hand-written Triton kernels for a conv net's training step.

``tritonkit.runtime`` is imported first: it decides, before any kernel is decorated, whether kernels
run compiled on a GPU or in Triton's interpreter.
"""

from tritonkit.runtime import runtime_info  # noqa: I001  (must run before kernels are imported)

__version__ = "0.1.0"
__all__ = ["runtime_info", "__version__"]
