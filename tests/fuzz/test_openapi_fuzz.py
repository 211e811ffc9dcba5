"""Fuzz the ingress from its own OpenAPI document: no 5xx, every error an OpenAI error object."""

from __future__ import annotations

import httpx
import pytest

from tests.fuzz.conftest import API_KEY, MAX_TOKENS
from tests.fuzz.openapi_fuzz import UNAUTHENTICATED_EVERY, run

pytestmark = pytest.mark.serve

# About 2,000 generated cases over every route the ingress forwards; the two generation routes
# get most of them.
PLAN = {
    ("POST", "/v1/completions"): {"positive": 500, "negative": 300},
    ("POST", "/v1/chat/completions"): {"positive": 450, "negative": 300},
    ("POST", "/v1/responses"): {"positive": 100, "negative": 50},
    ("POST", "/v1/messages"): {"positive": 100, "negative": 50},
    ("POST", "/v1/messages/count_tokens"): {"positive": 40, "negative": 20},
    ("POST", "/v1/embeddings"): {"positive": 40, "negative": 20},
    ("POST", "/tokenize"): {"positive": 60, "negative": 30},
    ("POST", "/detokenize"): {"positive": 60, "negative": 30},
    ("POST", "/v1/load_lora_adapter"): {"positive": 40, "negative": 20},
    ("POST", "/v1/unload_lora_adapter"): {"positive": 20, "negative": 10},
    ("GET", "/v1/models"): {"positive": 5},
    ("GET", "/health"): {"positive": 5},
}
MIN_CASES = 2000


def test_openapi_document_describes_the_request_bodies(fuzz_url):
    doc = httpx.get(f"{fuzz_url}/openapi.json").json()
    for path, schema in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                         ("/v1/responses", "ResponsesRequest"), ("/tokenize", "TokenizeCompletionRequest"),
                         ("/v1/messages", "AnthropicMessagesRequest"),
                         ("/v1/load_lora_adapter", "LoadLoRAAdapterRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{schema}"}
        assert doc["components"]["schemas"][schema]["properties"]["model"]["enum"] == ["tiny"]
        assert doc["paths"][path]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in doc["paths"]["/health"]["get"]


def test_fuzz_finds_no_server_error_and_only_openai_errors(fuzz_url):
    report = run(fuzz_url, API_KEY, PLAN, seed=0, workers=8, max_tokens=MAX_TOKENS)
    print(report.summary())
    for f in report.findings[:10]:
        print(f"--- {f.operation} [{f.mode}] {f.status}: {f.problem}\n    sent: {f.request[:300]}\n    got: {f.response[:300]}")
    assert report.cases >= MIN_CASES
    assert report.server_errors == 0
    assert not report.findings
    assert report.statuses[200] > 100, "too few cases reached the engine for the run to mean much"
    # A 401 exactly when the request went out without our key (the gate runs before anything else);
    # at least one case in UNAUTHENTICATED_EVERY went without it on purpose.
    print(f"keyless: {report.keyless_sent} sent, {report.keyless_refused} refused; keyed refused: "
          f"{report.keyed_refused}")
    assert report.keyed_refused == 0
    assert report.keyless_refused == report.keyless_sent == report.statuses[401]
    assert report.keyless_sent >= report.cases // UNAUTHENTICATED_EVERY // 2
