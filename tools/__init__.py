"""Tuners that measure this GPU and write the tables under kernels/measured/<GPU>/: ``python3 -m tools.NAME``."""
