"""CUDA sources of cuparing's kernels (package data) and their loader (``loader.py``).

Importing this package needs neither CuPy nor a GPU; only ``loader.get_*`` functions import CuPy.
"""
