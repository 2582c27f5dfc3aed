"""Kernel tests run the Triton kernels on CUDA when present, else in Triton's CPU interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must happen before anything imports triton
