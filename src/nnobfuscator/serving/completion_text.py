"""Text in and out of a served language model: prompts and chats to token ids (the tokenizer's
chat template), new token ids back to text chunks cut at stop strings, and server-sent events."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from nnobfuscator.serving.errors import ApiError


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """A completion prompt's token ids (with the tokenizer's special tokens, as ``generate``
    callers add them)."""
    return list(tokenizer(prompt)["input_ids"])


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """A conversation's token ids through the tokenizer's chat template, ending with the
    assistant's turn (``add_generation_prompt=True``).

    Raises:
        ApiError: 400 when the tokenizer has no chat template or the template refuses the
            messages (a role order it does not allow, for one).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400,
            "no_chat_template",
            "this model's tokenizer has no chat template: send the text to continue to "
            "POST /v1/completions instead",
            param="messages",
        )
    try:
        text = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
    except Exception as err:  # jinja2's TemplateError, or raise_exception() in the template
        raise ApiError(
            400,
            "invalid_messages",
            f"the model's chat template refused these messages ({err}); send "
            "[{'role': 'user', 'content': '...'}] with roles the model knows",
            param="messages",
        ) from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Detokenizer:
    """Turns a row's new token ids into text chunks, as they come.

    Each chunk is the text decoded so far minus what was sent; text that may still change is
    held back (an unfinished multi-byte character, or the start of a stop string). The text
    ends before the first stop string it contains (:attr:`stopped` turns true).

    Args:
        tokenizer: decodes the ids (special tokens skipped).
        stops: stop strings (up to 4).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """The text ``token`` adds that is safe to send now (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        ready = len(text.rstrip("\ufffd"))  # a multi-byte character not yet whole
        for stop in self.stops:  # the longest tail that could begin a stop string
            for size in range(min(len(stop) - 1, ready), 0, -1):
                if text[:ready].endswith(stop[:size]):
                    ready -= size
                    break
        return self._take(ready)

    def flush(self) -> str:
        """The rest of the text, once the row has ended."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        chunk, self.sent = self.text[self.sent : end], end
        return chunk


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: JSON`` (or the literal ``[DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
