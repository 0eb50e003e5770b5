"""Tools around the op, outside the library core: the health check, the training demo and the
benchmark helpers (``python -m mhpo_kernels {check,demo}``)."""
