"""Root pytest settings, loaded before anything imports linmix or triton.

Without a GPU, Triton kernels run in the interpreter. Triton reads TRITON_INTERPRET once, at its
import, and importing linmix may import it (transformers -> torch._dynamo -> triton): set it here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
