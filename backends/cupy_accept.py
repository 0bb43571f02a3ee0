"""CuPy RawKernels: accept (see cupy_kernels.py for the contract)."""
KERNELS: dict = {}
