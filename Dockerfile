# syntax=docker/dockerfile:1
# The kvpilot serving image: kvpilot with its `gpu` extra (vLLM with CUDA, ray[serve]) on a
# Ray image with CUDA. The Helm chart (helm/kvpilot) runs it on the Ray head and GPU workers;
# Serve imports `deployments.app:build_app` from the installed package.
#
#   docker build -t REGISTRY/kvpilot:0.1.0 .
#   docker push REGISTRY/kvpilot:0.1.0
#
# The base's Ray must be the version pyproject.toml pins (ray[serve]==2.60.0), and its Python
# the 3.11 kvpilot requires; vLLM's wheel brings the torch + CUDA runtime it was built with,
# so the base's CUDA tag matters only for what the node's NVIDIA driver supports.
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
    && python -c "import importlib.metadata as m, cluster.planner, deployments; print('kvpilot', m.version('kvpilot'), 'ray', m.version('ray'), 'vllm', m.version('vllm'))" \
    && rm -rf /home/ray/kvpilot-src

WORKDIR /home/ray
# The chart points HF_HOME at its model cache volume; this default serves `docker run`.
ENV HF_HOME=/home/ray/.cache/huggingface
