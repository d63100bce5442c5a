"""vdit_kernels.model: the thin video DiT on the package's fused ops (installed from model/)."""
