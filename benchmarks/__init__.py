"""The maintained benchmarks: run each as ``python3 -m benchmarks.NAME`` from the repository root."""
