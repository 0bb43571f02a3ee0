"""CuPy RawKernels: rope (see cupy_kernels.py for the contract)."""
KERNELS: dict = {}
