"""OpenAI request schemas (what clients send) and the plain request a model replica receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_N = 16  # choices per request: each is a full sequence in the engine
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it vLLM samples greedily and allows only n = 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    # OpenAI answers unknown arguments with 400 "Unrecognized request argument"; so do we.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM extension, used by benchmarks to force fixed-length outputs.
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_greedy_choice(cls, v: int, info: ValidationInfo) -> int:
        temperature = info.data.get("temperature")  # validated before n: declared first
        if v > 1 and temperature is not None and temperature < GREEDY_TEMPERATURE:
            raise ValueError("n must be 1 when temperature is 0: greedy sampling has one answer")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[int] = Field(description="Text, or token ids")
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[int]) -> str | list[int]:
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


@dataclass(frozen=True)
class GenerationRequest:
    """What the ingress sends a model replica: the tokenized prompt and how to sample.

    The ingress tokenizes (and renders chat templates), so the router can see
    the prompt's blocks and the context limit is enforced before any replica.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    logprobs: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


def sampling_of(req: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    return {
        "n": req.n,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": req.stop,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "ignore_eos": req.ignore_eos,
    }


def logprobs_of(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def messages_of(req: ChatCompletionRequest) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every 4xx/5xx the ingress answers has this body."""

    error: ErrorDetail
