"""Triton kernels for the native GPU engine, each beside a pure-torch twin with the same signature.

Every op module exposes ``<op>_torch``, ``<op>_triton`` and a dispatcher ``<op>`` (Triton on CUDA
tensors when triton imports, torch otherwise). Importing this package stays cheap: submodules are
imported explicitly by their users.
"""
