"""Request checks the ingress makes before a replica sees a request, where vLLM 0.32 would fail."""

import pytest

from deployments.ingress import _check_no_prompt_logprobs, _Refused


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 0}),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}),
    ("/v1/chat/completions", {"messages": [], "prompt_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [], "echo": True, "top_logprobs": 0}),  # vLLM: prompt_logprobs=0
])
def test_prompt_logprobs_on_a_cpu_lora_model_are_refused_naming_the_field(path, body):
    with pytest.raises(_Refused) as e:
        _check_no_prompt_logprobs(path, body, "tiny")
    assert e.value.status == 400 and e.value.param == "prompt_logprobs" and "tiny" in str(e.value.message)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "logprobs": 1}),  # output logprobs are fine
    ("/v1/completions", {"prompt": "x", "echo": True}),
    ("/v1/chat/completions", {"messages": [], "echo": True, "logprobs": True}),  # no top_logprobs: none asked
    ("/v1/chat/completions", {"messages": [], "logprobs": True, "top_logprobs": 3}),  # output logprobs
])
def test_other_logprobs_pass(path, body):
    _check_no_prompt_logprobs(path, body, "tiny")
