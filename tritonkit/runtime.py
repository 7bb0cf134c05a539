"""Which way tritonkit runs its Triton kernels: compiled on a CUDA GPU, or in Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so the choice is made
here, once, before ``tritonkit.kernels`` is imported (``tritonkit/__init__.py`` imports this module
first).

* ``TRITONKIT_INTERPRET=1`` forces the interpreter, ``TRITONKIT_INTERPRET=0`` forces compiled
  kernels (and fails at launch if there is no GPU).
* Otherwise: compiled kernels when ``torch.cuda.is_available()``, the interpreter when not.
* An explicit ``TRITON_INTERPRET`` set by the user is respected when ``TRITONKIT_INTERPRET`` is unset.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be one of 0/1/true/false, got {value!r}")


def _decide() -> tuple[bool, str]:
    forced = _parse_flag("TRITONKIT_INTERPRET")
    if forced is not None:
        return forced, "TRITONKIT_INTERPRET environment variable"
    user = _parse_flag("TRITON_INTERPRET")
    if user is not None:
        return user, "TRITON_INTERPRET environment variable"
    if torch.cuda.is_available():
        return False, "CUDA device found"
    return True, "no CUDA device found"


def _reinterpret_triton_language() -> None:
    """Turn ``triton.language``'s own ``@jit`` helpers (``tl.zeros``, ``tl.cdiv``, ``tl.sum``...) into
    interpreter functions when Triton was imported before interpreter mode was chosen.

    ``import torch._dynamo`` (so any ``torch.compile``) imports Triton; its helpers are then compiled-mode
    ``JITFunction`` objects that refuse to run inside an interpreted kernel.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction):
                setattr(module, attr, InterpretedFunction(obj.fn))


INTERPRET, _REASON = _decide()
os.environ["TRITON_INTERPRET"] = "1" if INTERPRET else "0"
if INTERPRET and "triton.language" in sys.modules:
    _reinterpret_triton_language()


@dataclass(frozen=True)
class RuntimeInfo:
    mode: str  # "interpreter" or "gpu"
    reason: str
    device: str  # the device tritonkit expects tensors on
    torch_version: str
    triton_version: str

    def __str__(self) -> str:
        return (
            f"tritonkit mode={self.mode} ({self.reason}); tensors on {self.device}; "
            f"torch {self.torch_version}, triton {self.triton_version}"
        )


def runtime_info() -> RuntimeInfo:
    """Say how kernels run in this process: ``mode`` is ``"gpu"`` or ``"interpreter"``."""
    import triton

    if INTERPRET:
        device = "cpu"
    else:
        device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cuda (none found)"
    return RuntimeInfo(
        mode="interpreter" if INTERPRET else "gpu",
        reason=_REASON,
        device=device,
        torch_version=torch.__version__,
        triton_version=triton.__version__,
    )


def default_device() -> torch.device:
    """The device tritonkit's kernels take tensors on in this mode."""
    return torch.device("cpu" if INTERPRET else "cuda")
