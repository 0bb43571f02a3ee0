"""Numba kernels: rope (see numba_kernels.py for the contract)."""
KERNELS: dict = {}
