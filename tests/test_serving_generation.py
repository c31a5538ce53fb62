"""OpenAI-compatible text generation over HTTP: /v1/completions and /v1/chat/completions on a tiny
random Llama with a tokenizer built offline (no hub): each key's tier, streaming, 4xx answers,
token quotas, and concurrent requests of different tiers sharing one generate() call."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from tiny_llama import tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nnobfuscator import TieredModel, obfuscate
from nnobfuscator.serving import KeyStore, ServeConfig, create_app
from nnobfuscator.serving.completion_text import Detokenizer
from nnobfuscator.serving.generation_batcher import GenerationBatcher, GenerationJob
from nnobfuscator.serving.testing import serve_in_thread

VOCAB = 97
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MAX_TOKENS = 8
TOKEN_QUOTA = 40  # the free tier's tokens per key per day
PROMPT = "w1 w2 w3 w4"  # 4 tokens; free and premium continue it differently
CHAT = [{"role": "user", "content": "w5 w6 w7"}]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny Llama's 97 ids (``w0`` ...), with a chat template."""
    words = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiered_lm(task: str = "text-generation") -> TieredModel:
    tiered = obfuscate(
        tiny_llama(pad_token_id=0, bos_token_id=1, eos_token_id=2),
        tiers="free=0.5,pro=0.8,premium=full",
        strategy="none",
        compute="block-skip",
        key=b"s" * 32,
        task=task,
        model_name="tiny-llama",
    )
    tiered.set_setting("free", "block-skip", {"skip": ["model.layers.1", "model.layers.2"]})
    tiered.set_setting("pro", "block-skip", {"skip": ["model.layers.3"]})
    return tiered


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiered() -> TieredModel:
    return tiered_lm()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> KeyStore:
    return KeyStore(tmp_path_factory.mktemp("keys") / "keys.sqlite")


@pytest.fixture(scope="module")
def app(tiered, tokenizer, store):
    config = ServeConfig(
        rate_limits={},
        max_tokens=MAX_TOKENS,
        default_max_tokens=MAX_TOKENS,
        token_quotas={"free": f"{TOKEN_QUOTA}/day"},
        generation_wait_ms=100.0,
    )
    return create_app(tiered, keys=store, config=config, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def server(app):
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def key(store: KeyStore, tier: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {store.create(tier)[1]}"}


def reference(tiered, tokenizer, ids: list[int], tier: str, **options) -> tuple[str, str]:
    """``TieredModel.generate`` at ``tier`` for one prompt, decoded as the server decodes: the
    text (up to the end token) and its finish reason."""
    prompt = torch.tensor([ids])
    options = {"max_new_tokens": MAX_TOKENS, "do_sample": False, **options}
    with torch.inference_mode():
        out = tiered.generate(prompt, attention_mask=torch.ones_like(prompt), tier=tier, **options)
    new = out[0, len(ids) :].tolist()
    finish = "stop" if 2 in new else "length"
    new = new[: new.index(2)] if 2 in new else new
    return tokenizer.decode(new, skip_special_tokens=True), finish


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def count_generate_calls(tiered: TieredModel, monkeypatch) -> list[int]:
    calls: list[int] = []
    generate = tiered.base_model.generate
    monkeypatch.setattr(
        tiered.base_model, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k)
    )
    return calls


def events(lines) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent event stream (``[DONE]`` as the string)."""
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --- answers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["free", "premium"])
def test_completion_and_chat_equal_generate_at_the_keys_tier(
    server, store, tiered, tokenizer, tier
):
    headers = key(store, tier)
    answer = server.post(
        "/v1/completions", headers=headers, json={"prompt": PROMPT, "model": "tiny-llama"}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    text, finish = reference(tiered, tokenizer, tokenizer(PROMPT)["input_ids"], tier)
    assert answer.headers["X-Tier"] == body["tier"] == tier
    assert body["object"] == "text_completion" and body["model"] == "tiny-llama"
    assert body["choices"] == [{"index": 0, "text": text, "finish_reason": finish}]
    made = len(tokenizer(text)["input_ids"])
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": made + (finish == "stop"),
                             "total_tokens": 4 + made + (finish == "stop")}  # fmt: skip
    assert "logprobs" not in body["choices"][0]

    chat = server.post("/v1/chat/completions", headers=headers, json={"messages": CHAT})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    text, finish = reference(tiered, tokenizer, chat_ids(tokenizer, CHAT), tier)
    assert chat.headers["X-Tier"] == body["tier"] == tier
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    ]


def test_the_tiers_continue_the_prompt_differently(tiered, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    texts = {tier: reference(tiered, tokenizer, ids, tier)[0] for tier in ("free", "premium")}
    assert texts["free"] != texts["premium"]


def test_sampling_repeats_with_the_same_seed_and_equals_generate(server, store, tiered, tokenizer):
    headers = key(store, "pro")
    request = {"prompt": PROMPT, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first, again = (server.post("/v1/completions", headers=headers, json=request) for _ in range(2))
    assert first.status_code == again.status_code == 200, first.text
    assert first.json()["choices"] == again.json()["choices"]
    options = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    text, _ = reference(tiered, tokenizer, tokenizer(PROMPT)["input_ids"], "pro", **options)
    assert first.json()["choices"][0]["text"] == text
    unseeded = {"prompt": PROMPT, "temperature": 0.9}  # a seed from the key and the prompt
    texts = {server.post("/v1/completions", headers=headers, json=unseeded).json()["choices"][0]["text"] for _ in range(2)}  # fmt: skip
    assert len(texts) == 1


def test_stop_strings_cut_the_text(server, store, tiered, tokenizer):
    full, _ = reference(tiered, tokenizer, tokenizer(PROMPT)["input_ids"], "premium")
    stop = full.split()[2]
    answer = server.post(
        "/v1/completions", headers=key(store, "premium"), json={"prompt": PROMPT, "stop": stop}
    )
    body = answer.json()
    assert body["choices"][0]["text"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


# --- streaming ---------------------------------------------------------------------------------
def stream(server: httpx.Client, path: str, headers: dict, body: dict, start: threading.Barrier):
    start.wait()
    with server.stream("POST", path, headers=headers, json={**body, "stream": True}) as answer:
        return answer.status_code, dict(answer.headers), events(answer.iter_lines())


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_two_keys_of_different_tiers_stream_at_once_from_one_generate_call(
    server, store, tiered, tokenizer, monkeypatch, path
):
    chat = path.endswith("chat/completions")
    body = {"messages": CHAT} if chat else {"prompt": PROMPT}
    ids = chat_ids(tokenizer, CHAT) if chat else tokenizer(PROMPT)["input_ids"]
    expected = {tier: reference(tiered, tokenizer, ids, tier) for tier in ("free", "premium")}
    assert expected["free"][0] != expected["premium"][0]
    calls = count_generate_calls(tiered, monkeypatch)
    start = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        futures = {
            tier: pool.submit(stream, server, path, key(store, tier), body, start)
            for tier in ("free", "premium")
        }
        answers = {tier: future.result() for tier, future in futures.items()}
    assert len(calls) == 1  # both rows decoded in one generate() call
    for tier, (status, headers, chunks) in answers.items():
        assert status == 200 and headers["x-tier"] == tier
        assert headers["content-type"].startswith("text/event-stream")
        assert chunks[-1] == "[DONE]"
        chunks = chunks[:-1]
        assert len(chunks) >= 3 and all(c["tier"] == tier for c in chunks)
        if chat:
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
            pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        else:
            assert {c["object"] for c in chunks} == {"text_completion"}
            pieces = [c["choices"][0]["text"] for c in chunks]
        assert "".join(pieces) == expected[tier][0]
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == expected[tier][1]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_streamed_usage_chunk_when_asked(server, store):
    body = {"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True}}
    with server.stream("POST", "/v1/completions", headers=key(store, "pro"), json=body) as answer:
        chunks = events(answer.iter_lines())
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == []
    assert chunks[-2]["usage"]["prompt_tokens"] == 4


def test_the_batcher_runs_one_generate_call_for_two_tiers(tiered, tokenizer, monkeypatch):
    calls = count_generate_calls(tiered, monkeypatch)
    short, long = tokenizer("w9 w8")["input_ids"], tokenizer(PROMPT)["input_ids"]

    async def run() -> list[list[int]]:
        batcher = GenerationBatcher(
            tiered.generate, pad_token_id=0, eos_token_ids=[2], share_key=tiered.executor.pass_key
        )
        rows = [
            batcher.submit(GenerationJob(short, "free", 5)),
            batcher.submit(GenerationJob(long, "premium", MAX_TOKENS)),
        ]

        async def collect(row) -> list[int]:
            return [token async for token in row]

        try:
            return await asyncio.gather(*(collect(row) for row in rows))
        finally:
            await batcher.aclose()

    free, premium = asyncio.run(run())
    assert len(calls) == 1
    expected = [
        tokenizer(reference(tiered, tokenizer, ids, tier, max_new_tokens=n)[0])["input_ids"]
        for ids, tier, n in ((short, "free", 5), (long, "premium", MAX_TOKENS))
    ]
    assert [free, premium] == expected
    assert len(free) == 5  # each row stops at its own max_new_tokens


def test_sampled_and_greedy_rows_run_in_separate_calls(tiered):
    batcher = GenerationBatcher(tiered.generate, pad_token_id=0)
    jobs = [
        GenerationJob([5, 6], "free", 2),
        GenerationJob([5, 6], "pro", 2, temperature=0.7, seed=1),
        GenerationJob([7, 8], "premium", 2),
        GenerationJob([5, 6, 7], "pro", 2, temperature=0.7, seed=2),  # its own positions
    ]

    class Row:
        def __init__(self, job):
            self.job = job

    groups = batcher.calls([Row(job) for job in jobs])  # type: ignore[arg-type]
    assert [[row.job.tier for row in group] for group in groups] == [
        ["free", "premium"],
        ["pro"],
        ["pro"],
    ]


def test_detokenizer_holds_back_what_may_start_a_stop_string(tokenizer):
    ids = tokenizer("w1 w2 w3")["input_ids"]
    text = Detokenizer(tokenizer, stops=["w2 w3"])
    assert [text.add(i) for i in ids] == ["w1", " ", ""] and text.stopped
    assert text.text == "w1 " and text.flush() == ""
    text = Detokenizer(tokenizer, stops=["w2 w9"])
    assert [text.add(i) for i in ids[:2]] == ["w1", " "] and not text.stopped
    assert text.flush() == "w2"  # the row ended: what was held back goes out
