# syntax=docker/dockerfile:1
# The kvpilot serving image: kvpilot with its `gpu` extra (vLLM with CUDA, ray[serve]) on a
# Ray image with CUDA. The Helm chart (helm/kvpilot) runs it on the Ray head and GPU workers;
# Serve imports `deployments.app:build_app` from the installed package.
#
#   docker build -t REGISTRY/kvpilot:0.1.0 .
#   docker push REGISTRY/kvpilot:0.1.0
#
# The base's Ray must be the version pyproject.toml pins (ray[serve]==2.60.0), and its Python
# the 3.11 kvpilot requires (vLLM 0.32.0's wheel: Requires-Python >=3.11,<3.15, manylinux_2_28).
# vLLM 0.32.0's PyPI wheel is built for CUDA 13.0 (VLLM_MAIN_CUDA_VERSION 13.0, torch==2.13.0,
# nvidia-cutlass-dsl[cu13]) and brings that runtime as pip packages; the base's CUDA 12.4
# toolkit is not what vLLM runs on. What matters is the node's NVIDIA driver: CUDA 13 needs
# R580 or newer. With a Ray image tagged for CUDA 13, pass it as --build-arg RAY_IMAGE=...
# (README "Kubernetes", "The image" says what is tested and what is not).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu124
FROM ${RAY_IMAGE}

# Only what the package build needs (pyproject reads README.md as the long description);
# configs travel in the RayService's serveConfigV2, not in the image. COPY --chown also owns the
# directories it creates, so pip (running as the image's `ray` user) can build in the tree.
COPY --chown=ray:users pyproject.toml README.md /home/ray/kvpilot-src/
COPY --chown=ray:users cluster /home/ray/kvpilot-src/cluster
COPY --chown=ray:users deployments /home/ray/kvpilot-src/deployments

# A regular (non-editable) install: cluster/ and deployments/ land in site-packages, so every
# Ray worker process imports them whatever its working directory. The check runs from / so it
# imports the installed package, not the source tree.
RUN pip install --no-cache-dir "/home/ray/kvpilot-src[gpu]" \
    && cd / \
    && python -c "import importlib.metadata as m, cluster.planning.planner, deployments; print('kvpilot', m.version('kvpilot'), 'ray', m.version('ray'), 'vllm', m.version('vllm'), 'torch', m.version('torch'))" \
    && rm -rf /home/ray/kvpilot-src

WORKDIR /home/ray
# The chart points HF_HOME at its model cache volume; this default serves `docker run`.
ENV HF_HOME=/home/ray/.cache/huggingface
