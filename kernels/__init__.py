"""Triton kernels and their launch helpers, installed as ``fastcl.kernels``.

Kernels only: no autograd and no backend policy (those live in ``fastcl.ops``)."""
