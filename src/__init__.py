"""dogkernel sources; build_kernel.py bundles them into kernel.py."""
