"""Request checks the ingress makes before a replica sees a request, where vLLM 0.32 would fail."""

import pytest

from deployments.ingress import _check_no_prompt_logprobs, _check_responses_input, _Refused


# Every way a body can mention the fields vLLM reads for prompt logprobs, on both generation routes
_LOGPROB_FIELDS = [{}, {"echo": True}, {"echo": "true"}, {"echo": False}, {"echo": "off"}, {"echo": 1}]
_LOGPROB_FIELDS = [dict(e, **x) for e in _LOGPROB_FIELDS for x in (
    {}, {"logprobs": 1}, {"logprobs": True}, {"top_logprobs": 0}, {"top_logprobs": 3}, {"top_logprobs": None},
    {"prompt_logprobs": 0}, {"prompt_logprobs": None}, {"logprobs": True, "top_logprobs": 2})]


def _vllm_asks_prompt_logprobs(path: str, body: dict) -> bool | None:
    """What vLLM 0.32 itself makes of the body: None where its protocol refuses the body."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    cls = CompletionRequest if path == "/v1/completions" else ChatCompletionRequest
    base = {"model": "tiny", "prompt": "x"} if path == "/v1/completions" else {
        "model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    try:
        request = cls(**base, **body)
    except (ValidationError, VLLMValidationError):
        return None
    return request.to_sampling_params(8, {}).prompt_logprobs is not None


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("body", _LOGPROB_FIELDS, ids=str)
def test_prompt_logprobs_are_refused_exactly_when_vllm_would_compute_them(path, body):
    """The refusal mirrors vLLM's own to_sampling_params (a chat's echo alone asks for them: its
    top_logprobs defaults to 0, and null becomes 0; a fresh clone lost the fuzz model's engine to that)."""
    asked = _vllm_asks_prompt_logprobs(path, body)
    try:
        _check_no_prompt_logprobs(path, body, "tiny")
        refused = False
    except _Refused as e:
        assert e.status == 400 and e.param == "prompt_logprobs" and "tiny" in str(e.message)
        refused = True
    if asked is None:  # vLLM refuses the body itself: refusing it first loses nothing
        return
    assert refused == asked, f"vLLM computes prompt logprobs: {asked}; the ingress refused: {refused}"


_OUT = {"type": "output_text", "text": "a", "annotations": []}
_REFUSAL = {"type": "refusal", "refusal": "no"}
_TOOL_OUT = {"type": "function_call_output", "call_id": "c", "output": "4"}
# Responses inputs around the items vLLM 0.32 builds chat messages from by reading content[0].text
_RESPONSES_INPUTS = [
    [{"type": "message", "role": role, **extra, "content": content}, *after]
    for role in ("assistant", "user", "system")
    for extra in ({}, {"id": "m", "status": "completed"})
    for content in ([], [_REFUSAL], [_OUT, _REFUSAL], [_OUT], [{"type": "input_text", "text": "hi"}], "hi")
    for after in ((), (_TOOL_OUT,))
] + [[{"type": "reasoning", "id": "r", "summary": [], "content": []}], "hello"]


def _vllm_builds_messages(items) -> bool | None:
    """Whether vLLM 0.32 builds chat messages from the input; None where its protocol refuses the body."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.openai.responses.utils import construct_input_messages
    from vllm.exceptions import VLLMValidationError

    try:
        request = ResponsesRequest(model="tiny", input=items)
    except (ValidationError, VLLMValidationError):
        return None
    try:
        construct_input_messages(request_input=request.input)
    except (AttributeError, IndexError):  # what reached the client as a 500
        return False
    return True


@pytest.mark.parametrize("items", _RESPONSES_INPUTS, ids=str)
def test_responses_inputs_vllm_fails_on_are_refused_and_only_those(items):
    built = _vllm_builds_messages(items)
    try:
        _check_responses_input({"input": items})
        refused = False
    except _Refused as e:
        expected = "input[0].content" if items[0]["content"] == [] else "input[0].content[0]"
        assert (e.status, e.param) == (400, expected)
        refused = True
    if built is not None:
        assert refused == (not built), f"vLLM builds the messages: {built}; the ingress refused: {refused}"
