import os

# Keep torch from oversubscribing the 2-core CI machine when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")

try:
    import torch

    # Triton reads this when a kernel is defined: on a machine without CUDA, kernels run interpreted.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # the router-only environment has no torch
    pass
