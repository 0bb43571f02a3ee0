"""CuPy RawKernels: xent (see cupy_kernels.py for the contract)."""
KERNELS: dict = {}
