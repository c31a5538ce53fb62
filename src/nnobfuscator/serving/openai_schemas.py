"""Bodies of the OpenAI-compatible text-generation routes (``/v1/completions``,
``/v1/chat/completions``): requests refuse unknown fields, answers have OpenAI's shapes plus
the ``tier`` that produced them.

No answer carries ``logprobs``: a tier answers text only, never token probabilities, which
would show more of the model than the tier sells.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: fields of OpenAI's API refused on purpose, with what to do instead
REFUSED_FIELDS = {
    "logprobs": "token probabilities are not offered: a tier answers text only",
    "top_logprobs": "token probabilities are not offered: a tier answers text only",
    "echo": "the prompt is not echoed back: you have it already",
    "best_of": "one answer per request: send another request for another answer",
    "logit_bias": "logit_bias is not offered: the model's logits stay on the server",
    "suffix": "insertion (suffix) is not offered: send the text before the gap as the prompt",
    "presence_penalty": "penalties are not offered: use temperature and top_p",
    "frequency_penalty": "penalties are not offered: use temperature and top_p",
    "tools": "tool calls are not offered by this server",
    "tool_choice": "tool calls are not offered by this server",
    "functions": "function calls are not offered by this server",
    "response_format": "response_format is not offered: ask for the format in the prompt",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = Field(
        False, description="Send the token counts in one last chunk before `[DONE]`."
    )


class _GenerationRequest(_Strict):
    model: str | None = Field(
        None, description="The served model's name (GET /v1/tiers); may be left out."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (the server's default and cap apply)."
    )
    temperature: float | None = Field(
        None, ge=0, le=2, description="0 or absent: greedy; above 0: sampled (with `seed`)."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (sampled only).")
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Sampling seed: the same prompt, seed and tier give the same text. Without "
        "one it is derived from the key and the prompt, so a repeated request repeats its text.",
    )
    stream: bool = Field(False, description="Answer as server-sent events, chunk by chunk.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description="Up to 4 strings; the text ends before the first one it contains."
    )
    n: int = Field(1, ge=1, le=1, description="Answers per request: 1 only.")
    user: str | None = Field(None, description="Your end user's id (accepted, not used).")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return None
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_GenerationRequest):
    prompt: str = Field(description="The text to continue; must not be empty.")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] = Field(description="A string, or a list of text parts.")
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="OpenAI's newer name for max_tokens."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    tier: str = Field(description="The tier that produced this answer (also in `X-Tier`).")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    tier: str = Field(description="The tier that produced this answer (also in `X-Tier`).")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    tier: str
