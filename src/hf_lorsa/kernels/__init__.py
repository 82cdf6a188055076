"""CPU kernels: the attention and projection paths that exist only for the speed of a CPU, and its allocator."""
