"""Tools run from the repo root as ``python3 -m tools.NAME``: tuners that measure this GPU and write
the tables under kernels/measured/<GPU>/, ``gguf_to_hf`` (a GGUF file to a model directory) and
``measure_type_costs`` (the per-type loss costs of the ``acttail`` allocation)."""
