"""Tools run from the repo root as ``python3 -m tools.NAME``: tuners that measure this GPU and write
the tables under kernels/measured/<GPU>/, and ``gguf_to_hf`` (a GGUF file to a model directory)."""
