"""vLLM general plugin: registers the ``acttail`` quantization method in every vLLM process.

Installed as the ``vllm.general_plugins`` entry point ``acttail``, so after
``pip install acttail-vllm`` a plain ``vllm serve MODEL --quantization acttail`` finds it.
"""


def register() -> None:
    from vllm.model_executor.layers.quantization import register_quantization_config

    from acttail_vllm.serving.config import ActTailConfig
    from acttail_vllm.serving.metrics import share_metrics_across_processes
    from acttail_vllm.serving.op import register_sparse_linear_op

    share_metrics_across_processes()
    register_sparse_linear_op()
    register_quantization_config("acttail")(ActTailConfig)
