"""The gated HRM model layer on hrm_kernels (in progress)."""
