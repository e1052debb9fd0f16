"""Triton's interpreter for the kernel tests on machines without CUDA.

``TRITON_INTERPRET=1`` must be set before triton is first imported (triton.language's own helpers are decorated at
import), so it is set here, when this directory is collected, and only where there is no CUDA: on a GPU machine the
same tests run the compiled kernels instead (the interpreter tests then skip).
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
