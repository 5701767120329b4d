# vLLM's OpenAI-compatible server image with the ActTail plugin installed (CUDA hosts).
#   docker build -t acttail-vllm .          (deploy/docker-compose.yml builds it for you)
# The tag follows vLLM's Docker Hub scheme (v<version>) and matches the `gpu` extra in pyproject.toml.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.26.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/acttail
COPY pyproject.toml README.md ./
COPY acttail_vllm ./acttail_vllm
COPY kernels ./kernels
# --no-deps: the image already ships torch, triton, pydantic, prometheus-client and the rest, and a
# resolver run could swap its CUDA build of torch. The import check fails the build if one is missing,
# and the entry-point check fails it if vLLM would not find the plugins.
RUN uv pip install --system --no-cache --no-deps . \
 && python3 -c "import acttail_vllm.plugin, acttail_vllm.serving.stat_logger, acttail_kernels" \
 && python3 -c "from importlib.metadata import entry_points as e; \
assert {'acttail'} <= {p.name for p in e(group='vllm.general_plugins')}; \
assert {'acttail'} <= {p.name for p in e(group='vllm.stat_logger_plugins')}"
WORKDIR /
# The base image's entrypoint stays `vllm serve`: the compose file passes MODEL and the flags.
