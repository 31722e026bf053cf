"""moh's own compiled kernels, shared by the parts that use them (the sparse backend, routers):
``moh.kernels.cpu`` (C++ for CPU tensors, built on first use). The Triton kernels for CUDA live
with the sparse backend (``moh.backends.sparse.triton_kernels``)."""
