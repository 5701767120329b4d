"""ActTail: heavy-tail-guided global activation sparsity for vLLM decoding."""

__version__ = "0.1.0"
