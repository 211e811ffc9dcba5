"""What the ingress sends a model replica: the client's HTTP request, as bytes, plus routing facts.

The replica answers it with vLLM's own OpenAI server code (``deployments/vllm_frontend.py``),
so kvpilot has no request schema of its own: vLLM's is the one clients meet.
"""

from __future__ import annotations

from dataclasses import dataclass

# The OpenAI-protocol routes the ingress forwards to a model's replica (POST, ``model`` in the body).
# vLLM's app answers each one; those the model's task does not serve get vLLM's 404.
FORWARDED_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/tokenize",
    "/detokenize",
)
# vLLM's runtime adapter routes: only admin keys reach them, and the ingress applies them to the model.
LORA_ADMIN_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
# Request headers a replica gets; never the client's key (the replica's app has no keys).
FORWARDED_HEADERS = frozenset({b"content-type", b"accept", b"x-request-id", b"anthropic-version"})


@dataclass
class HttpCall:
    """One client request for a model replica; the router reads ``prompt_token_ids`` and ``max_tokens``."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    request_id: str
    prompt_token_ids: list[int]  # as the ingress tokenized the prompt; empty when it could not
    max_tokens: int  # the output budget the ingress charged (prompt + this bounds the KV it may take)
    adapter: str | None = None  # the LoRA adapter the body's `model` names (None: the base model); the router reads it
    adapter_path: str | None = None  # its directory: a replica that does not know the adapter yet registers it
