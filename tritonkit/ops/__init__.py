"""``torch.ops.tritonkit.*``: the custom ops that wrap tritonkit's kernels, each with a fake impl.

Importing this package registers every op family.
"""

from tritonkit.ops import conv, depthwise, elementwise, layer_norm, linear, loss, norm, optim, pool  # noqa: F401
