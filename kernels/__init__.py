"""tritonkit's Triton kernels and their thin launchers, one module per op family.

Importing this package goes through ``tritonkit/__init__.py`` first, which chooses between compiled
kernels and Triton's interpreter before any ``@triton.jit`` runs (see ``tritonkit.runtime``).
Every kernel registers itself in :data:`tritonkit.kernels.common.REGISTRY`, which the launchers'
autotuners and the AOT compile gate both read.
"""
