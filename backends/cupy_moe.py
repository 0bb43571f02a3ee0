"""CuPy RawKernels: moe (see cupy_kernels.py for the contract)."""
KERNELS: dict = {}
