"""OpenAI-compatible text generation over HTTP: /v1/completions and /v1/chat/completions on a tiny
random Llama with a tokenizer built offline (no hub): each key's tier, streaming, 4xx answers,
token quotas, and concurrent requests of different tiers sharing one generate() call."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tiny_chat import (
    CHAT_TEMPLATE,
    chat_ids,
    events,
    reference,
    tiered_lm,
    tiny_tokenizer,
)
from tiny_llama import count_generate_calls, tiny_llama
from transformers import PreTrainedTokenizerFast

from nnobfuscator import TieredModel
from nnobfuscator.serving import KeyStore, ServeConfig, create_app
from nnobfuscator.serving.completion_text import Detokenizer
from nnobfuscator.serving.generation_batcher import GenerationBatcher, GenerationJob
from nnobfuscator.serving.testing import serve_in_thread

MAX_TOKENS = 8
TOKEN_QUOTA = 40  # the free tier's tokens per key per day
PROMPT = "w1 w2 w3 w4"  # 4 tokens; free and premium continue it differently
CHAT = [{"role": "user", "content": "w5 w6 w7"}]


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
    made = len(tokenizer(text)["input_ids"]) + (finish == "stop")  # the end token counts
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": made,
        "total_tokens": 4 + made,
    }
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


def test_the_end_token_stops_a_row_and_counts_as_made(server, store, tiered, tokenizer):
    prompt = "w9 w8 w7 w6 w5 w4"  # premium ends it before max_tokens
    text, finish = reference(tiered, tokenizer, tokenizer(prompt)["input_ids"], "premium")
    assert finish == "stop"
    answer = server.post(
        "/v1/completions", headers=key(store, "premium"), json={"prompt": prompt}
    ).json()
    assert answer["choices"][0] == {"index": 0, "text": text, "finish_reason": "stop"}
    made = len(tokenizer(text)["input_ids"]) + 1
    assert answer["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": made,
        "total_tokens": 6 + made,
    }


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
    repeats = [server.post("/v1/completions", headers=headers, json=unseeded) for _ in range(2)]
    assert len({answer.json()["choices"][0]["text"] for answer in repeats}) == 1


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
        GenerationJob([5, 6, 7], "pro", 2, temperature=0.7, seed=2),  # a longer prompt
        GenerationJob([5, 6], "pro", 2, temperature=0.9, seed=3),  # another temperature
    ]

    class Row:
        def __init__(self, job):
            self.job = job

    groups = batcher.calls([Row(job) for job in jobs])  # type: ignore[arg-type]
    assert [[(row.job.tier, row.job.seed) for row in group] for group in groups] == [
        [("free", 0), ("premium", 0)],  # greedy
        [("pro", 1), ("pro", 2)],  # sampled at 0.7, prompts of two lengths
        [("pro", 3)],
    ]


def test_detokenizer_holds_back_what_may_start_a_stop_string(tokenizer):
    ids = tokenizer("w1 w2 w3")["input_ids"]
    text = Detokenizer(tokenizer, stops=["w2 w3"])
    assert [text.add(i) for i in ids] == ["w1", " ", ""] and text.stopped
    assert text.text == "w1 " and text.flush() == ""
    text = Detokenizer(tokenizer, stops=["w2 w9"])
    assert [text.add(i) for i in ids[:2]] == ["w1", " "] and not text.stopped
    assert text.flush() == "w2"  # the row ended: what was held back goes out


# --- bad input ---------------------------------------------------------------------------------
LONG = " ".join(f"w{i % 90}" for i in range(64))  # the whole context of 64 tokens
NEARLY = " ".join(f"w{i % 90}" for i in range(60))  # fits, but not with 8 new tokens
COMPLETION_CASES = [
    ({"prompt": ""}, 400, "empty_prompt", "prompt"),
    ({"prompt": "   "}, 400, "empty_prompt", "prompt"),
    ({"prompt": LONG}, 400, "prompt_too_long", "prompt"),
    ({"prompt": NEARLY, "max_tokens": MAX_TOKENS}, 400, "prompt_too_long", "prompt"),
    ({"prompt": PROMPT, "logprobs": 2}, 400, "unsupported_field", "logprobs"),
    ({"prompt": PROMPT, "echo": True}, 400, "unsupported_field", "echo"),
    ({"prompt": PROMPT, "colour": "red"}, 400, "unknown_field", "colour"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens_too_large", "max_tokens"),
    ({"prompt": PROMPT, "temperature": 3}, 400, "invalid_request", "temperature"),
    ({"prompt": PROMPT, "n": 2}, 400, "invalid_request", "n"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request", "stop"),
    ({"prompt": ["two", "prompts"]}, 400, "invalid_request", "prompt"),
    ({"prompt": PROMPT, "model": "gpt-4o"}, 404, "model_not_found", "model"),
    ({}, 400, "invalid_request", "prompt"),
]
CHAT_CASES = [
    ({"messages": []}, 400, "invalid_request", "messages"),
    ({"messages": "hello"}, 400, "invalid_request", "messages"),
    ({"messages": [{"role": "robot", "content": "w1"}]}, 400, "invalid_request", "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 400, "invalid_request", "messages.0.content"),
    ({"messages": [{"role": "user", "content": "w1", "mood": "x"}]}, 400, "invalid_request",
     "messages.0.mood"),
    ({"messages": [{"role": "user", "content": " "}]}, 400, "empty_prompt", "messages"),
    ({"messages": CHAT, "max_tokens": 2, "max_completion_tokens": 3}, 400, "invalid_request",
     "max_tokens"),
    ({"messages": CHAT, "top_logprobs": 2}, 400, "unsupported_field", "top_logprobs"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [("/v1/completions", *case) for case in COMPLETION_CASES]
    + [("/v1/chat/completions", *case) for case in CHAT_CASES],
)
def test_bad_input_gets_a_clear_openai_style_4xx_with_the_tier(
    server, store, path, body, status, code, param
):
    answer = server.post(path, headers=key(store, "pro"), json=body)
    assert answer.status_code == status, answer.text
    assert answer.headers["X-Tier"] == "pro"
    error = answer.json()["error"]
    assert error["code"] == code and error["param"] == param
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 20
    assert answer.json()["detail"] == error["message"]


def test_error_messages_say_what_to_do(server, store):
    headers = key(store, "pro")
    long = server.post("/v1/completions", headers=headers, json={"prompt": LONG}).json()
    assert "64 tokens; at most 56 fit (the model's context of 64 tokens" in long["detail"]
    assert "shorten it or lower max_tokens" in long["detail"]
    fitted = server.post("/v1/completions", headers=headers, json={"prompt": NEARLY}).json()
    assert fitted["usage"]["completion_tokens"] == 4  # the default max_tokens shrinks to fit
    many = {"prompt": PROMPT, "max_tokens": 100}
    cap = server.post("/v1/completions", headers=headers, json=many).json()
    assert f"at most {MAX_TOKENS} tokens" in cap["detail"]
    probs = server.post("/v1/completions", headers=headers, json={"prompt": PROMPT, "logprobs": 1})
    assert "text only" in probs.json()["detail"]
    unknown = server.post("/v1/completions", headers=headers, json={"prompt": PROMPT, "x": 1})
    assert "this endpoint takes: model, max_tokens" in unknown.json()["detail"]
    json_type = {**headers, "Content-Type": "application/json"}
    raw = server.post("/v1/completions", headers=json_type, content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    text = server.post("/v1/completions", headers=headers, content=b"w1", params={})
    assert text.status_code == 415


def test_no_key_gets_401_in_openai_shape(server):
    answer = server.post("/v1/chat/completions", json={"messages": CHAT})
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "authentication_error"


def test_other_tasks_and_missing_tokenizer_get_clear_answers(store, tiered, tokenizer):
    from fastapi.testclient import TestClient

    headers = key(store, "pro")
    classifier = TestClient(
        create_app(tiered_lm("classification"), keys=store, tokenizer=tokenizer)
    )
    answer = classifier.post("/v1/completions", headers=headers, json={"prompt": PROMPT})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "task_not_served"
    assert "needs a text-generation model" in answer.json()["detail"]
    assert "serves a classification model" in answer.json()["detail"]
    bare = TestClient(create_app(tiered, keys=store))  # no tokenizer
    answer = bare.post("/v1/completions", headers=headers, json={"prompt": PROMPT})
    assert answer.status_code == 503 and "tokenizer" in answer.json()["detail"]
    assert answer.headers["X-Tier"] == "pro"
    image = bare.post("/v1/classify", headers=headers, content=b"x")
    assert image.status_code == 404 and "/v1/completions" in image.json()["detail"]


# --- tokens in quotas and usage ----------------------------------------------------------------
def test_token_quota_counts_prompt_and_completion_then_refuses(
    server, store, app, tiered, tokenizer
):
    record, secret = store.create("free")
    headers = {"X-API-Key": secret}
    free, _ = reference(tiered, tokenizer, tokenizer(PROMPT)["input_ids"], "free")
    early = {"prompt": PROMPT, "stop": free.split()[1]}  # 2 tokens made: 6 of 12 given back
    answers = [server.post("/v1/completions", headers=headers, json=early)]
    for _ in range(3):
        answers.append(server.post("/v1/completions", headers=headers, json={"prompt": PROMPT}))
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].json()["usage"]["total_tokens"] == 6
    assert answers[0].headers["X-Token-Quota-Limit"] == f"{TOKEN_QUOTA}/day"
    assert answers[1].headers["X-Token-Quota-Remaining"] == str(TOKEN_QUOTA - 6 - 12)
    refused = answers[-1]
    assert refused.headers["X-Tier"] == "free" and int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "token_quota_exhausted" and error["type"] == "insufficient_quota"
    assert "token quota of tier 'free' used up" in error["message"]
    assert "10 tokens left" in error["message"] and "lower max_tokens" in error["message"]
    fits = server.post("/v1/completions", headers=headers, json={"prompt": PROMPT, "max_tokens": 6})
    assert fits.status_code == 200  # 4 + 6 = the 10 tokens left
    app.state.usage.flush()
    rows = app.state.usage.rows(record.id)
    assert sum(r.tokens for r in rows) == TOKEN_QUOTA and {r.tier for r in rows} == {"free"}


def test_a_request_larger_than_the_whole_token_quota_is_refused(server, store):
    prompt = " ".join(f"w{i}" for i in range(TOKEN_QUOTA - 5))  # 35 + 8 > 40
    answer = server.post("/v1/completions", headers=key(store, "free"), json={"prompt": prompt})
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "token_quota_exceeded"
    assert "more than the whole token quota" in answer.json()["detail"]


def test_tiers_list_the_token_quota(server):
    tiers = {t["name"]: t for t in server.get("/v1/tiers").json()["tiers"]}
    assert tiers["free"]["token_quota"] == f"{TOKEN_QUOTA}/day"
    assert tiers["premium"]["token_quota"] is None


# --- artifacts ---------------------------------------------------------------------------------
def test_an_artifact_brings_its_tokenizer(tmp_path, tokenizer, monkeypatch, store):
    from fastapi.testclient import TestClient

    from nnobfuscator.jobs import sources
    from nnobfuscator.serving.served_model import load_artifact

    tiered = tiered_lm()
    tiered.meta["source"] = {"model": {"zoo": "tiny-llama"}}
    tiered.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))  # as jobs.run writes it

    def rebuilt(source, progress):  # the artifact's stored source, rebuilt
        return tiny_llama(pad_token_id=0, bos_token_id=1, eos_token_id=2), {}

    monkeypatch.setattr(sources, "load_base_model", rebuilt)
    served = load_artifact(tmp_path)
    assert served.tokenizer is not None and served.tokenizer.chat_template == CHAT_TEMPLATE
    assert served.tokenizer(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    client = TestClient(create_app(tmp_path, keys=store))
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS}
    answer = client.post("/v1/completions", headers=key(store, "free"), json=body)
    expected, _ = reference(tiered, tokenizer, tokenizer(PROMPT)["input_ids"], "free")
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == expected


def test_a_failed_generate_ends_the_answer_with_a_clear_error(server, store, tiered, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tiered.base_model, "generate", broken)
    headers = key(store, "pro")
    whole = server.post("/v1/completions", headers=headers, json={"prompt": PROMPT})
    assert whole.status_code == 500 and whole.headers["X-Tier"] == "pro"
    error = whole.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "generation_failed"
    assert "retry the request" in error["message"]
    body = {"messages": CHAT, "stream": True}
    with server.stream("POST", "/v1/chat/completions", headers=headers, json=body) as answer:
        chunks = events(answer.iter_lines())
    assert answer.status_code == 200 and answer.headers["X-Tier"] == "pro"
    assert chunks[-1]["error"]["code"] == "generation_failed" and "[DONE]" not in chunks
    monkeypatch.undo()
    again = server.post("/v1/completions", headers=headers, json={"prompt": PROMPT})
    assert again.status_code == 200  # the batcher outlives a failed call
