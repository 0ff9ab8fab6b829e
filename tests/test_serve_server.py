"""kvjax.serve.server: the OpenAI-compatible HTTP server, as clients see it.

A real uvicorn server on a free loopback port (``BackgroundServer``) serves the bundled
model's ``Engine`` on the CPU; the official ``openai`` client and raw ``httpx`` talk to
it. Greedy answers are compared with ``kvjax.generate`` of each prompt (one batched call:
greedy rows are independent of each other, and a shorter ``max_tokens`` is a prefix of a
longer one)."""

import asyncio
import json
import os
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import kvjax
from kvjax.serve import Engine
from kvjax.serve import cli
from kvjax.serve.server import BackgroundServer, create_app

KEY = "test-key"
NAME = "kvjax-tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENGINE = dict(max_len=128, block_size=16, pool_blocks=65, max_prefill_tokens=64)
SUBJECTS = ["The list type", "A dictionary maps", "The Python interpreter", "Tuples are",
            "The for statement", "Exceptions are raised", "A module is", "Strings support",
            "The import system", "Generators yield"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return kvjax.load(kvjax.BUNDLED_MODEL)


@pytest.fixture(scope="module")
def served(model):
    """The module's server: 8 rows, every program compiled before it starts."""
    engine = Engine(model, max_rows=8, **ENGINE)
    engine.warmup()
    with BackgroundServer(create_app(engine, model_name=NAME, api_key=KEY)) as server:
        yield server, engine


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def scrape(url: str) -> dict:
    """``/metrics`` parsed by prometheus_client: ``{sample name (with labels): value}``."""
    text = httpx.get(url + "/metrics", headers=AUTH).raise_for_status().text
    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def events(body: str) -> list:
    """A server-sent-events body as its ``data`` payloads (JSON, or the ``[DONE]`` text);
    every event must be one ``data: ...`` line and the body must end in ``[DONE]``."""
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    parts = body[:-2].split("\n\n")
    assert all(p.startswith("data: ") and "\n" not in p for p in parts), parts
    return [p[6:] if p == "data: [DONE]" else json.loads(p[6:]) for p in parts]


def check_error(response: httpx.Response, status: int, code=None, param=None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and error["param"] == param, error
    return error["message"]


# ----- many clients at once ---------------------------------------------------------

async def ask(client, kind: str, prompt, max_tokens: int) -> dict:
    """One request as ``kind`` = client/endpoint/mode; returns the text, finish reason and
    usage the client received."""
    who, endpoint, mode = kind.split("/")
    chat = endpoint == "chat"
    args = {"model": NAME, "max_tokens": max_tokens, "temperature": 0,
            ("messages" if chat else "prompt"): prompt}
    if mode == "stream":
        args |= {"stream": True, "stream_options": {"include_usage": True}}
    if who == "openai":
        create = (client.chat.completions if chat else client.completions).create
        if mode != "stream":
            r = await create(**args)
            c = r.choices[0]
            return {"text": c.message.content if chat else c.text,
                    "finish_reason": c.finish_reason, "usage": r.usage.model_dump()}
        pieces, finish, usage = [], None, None
        async for chunk in await create(**args):
            if chunk.usage:
                usage = chunk.usage.model_dump()
            for c in chunk.choices:
                pieces.append((c.delta.content or "") if chat else c.text)
                finish = c.finish_reason or finish
        return {"text": "".join(pieces), "finish_reason": finish, "usage": usage}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if mode != "stream":
        body = (await client.post(path, json=args)).raise_for_status().json()
        c = body["choices"][0]
        return {"text": c["message"]["content"] if chat else c["text"],
                "finish_reason": c["finish_reason"], "usage": body["usage"]}
    *chunks, usage, _ = events((await client.post(path, json=args)).raise_for_status().text)
    choices = [c["choices"][0] for c in chunks]
    return {"text": "".join(c["delta"].get("content", "") if chat else c["text"]
                            for c in choices),
            "finish_reason": choices[-1]["finish_reason"], "usage": usage["usage"]}


def references(model, prompts: list, max_tokens: list[int]) -> list[dict]:
    """What each request must get: greedy ``kvjax.generate`` of all prompts in one batch,
    cut at each request's ``max_tokens``."""
    tokenizer = model.tokenizer
    ids = [tokenizer.encode(tokenizer.apply_chat_template(p), add_special_tokens=False)
           if isinstance(p, list) else tokenizer.encode(p) for p in prompts]
    out = kvjax.generate(model, ids, max_new_tokens=max(max_tokens), temperature=0)
    expected = []
    for prompt_ids, tokens, limit in zip(ids, out.tokens, max_tokens):
        tokens = tokens[:limit]
        stopped = tokens[-1] in model.stop_tokens
        expected.append({"text": tokenizer.decode(tokens),
                         "finish_reason": "stop" if stopped else "length",
                         "prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens)})
    return expected


def test_200_concurrent_requests_each_get_their_own_answer(served, model):
    server, engine = served
    kinds = [f"{who}/{endpoint}/{mode}" for who in ("openai", "httpx")
             for endpoint in ("completions", "chat") for mode in ("whole", "stream")]
    requests = []
    for i in range(200):
        kind = kinds[i % len(kinds)]
        text = f"{SUBJECTS[i % len(SUBJECTS)]} {i}"
        prompt = [{"role": "user", "content": text}] if "/chat/" in kind else text
        requests.append((kind, prompt, 8 if i % 3 else 14))
    expected = references(model, [p for _, p, _ in requests], [m for _, _, m in requests])
    before = engine.stats()

    async def run_all():
        limits = httpx.Limits(max_connections=200)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                                      timeout=120) as oai, \
                httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120,
                                  limits=limits) as raw:
            return await asyncio.gather(*(ask(oai if kind.startswith("openai") else raw, kind,
                                              prompt, max_tokens)
                                          for kind, prompt, max_tokens in requests))

    answers = asyncio.run(run_all())
    for (kind, prompt, _), answer, want in zip(requests, answers, expected):
        assert answer["text"] == want["text"], (kind, prompt)
        assert answer["finish_reason"] == want["finish_reason"], (kind, prompt)
        usage = answer["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
            want["prompt_tokens"], want["completion_tokens"]), (kind, prompt)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 0
    after = engine.stats()
    assert after["requests_finished"] - before["requests_finished"] == 200
    assert after["requests_refused"] == before["requests_refused"]
    assert after["generation_tokens"] - before["generation_tokens"] == sum(
        w["completion_tokens"] for w in expected)


# ----- the wire format --------------------------------------------------------------

def test_server_sent_events_follow_openai(served):
    server, _ = served
    body = {"model": NAME, "prompt": "The list type", "max_tokens": 10, "temperature": 0}
    whole = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH).json()
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    response = httpx.post(server.url + "/v1/completions", headers=AUTH,
                          json=body | {"stream": True, "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    *chunks, usage, done = events(response.text)
    assert done == "[DONE]"
    assert {c["id"] for c in chunks + [usage]} == {chunks[0]["id"]}
    assert all(c["object"] == "text_completion" and c["model"] == NAME for c in chunks)
    assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None
               for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": whole["choices"][0]["finish_reason"]}
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]

    chat = {"model": NAME, "messages": [{"role": "user", "content": "Tuples are"}],
            "max_completion_tokens": 10, "temperature": 0}
    whole = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=AUTH).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["role"] == "assistant"
    chunks = events(httpx.post(server.url + "/v1/chat/completions", headers=AUTH,
                               json=chat | {"stream": True}).text)
    assert chunks.pop() == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:-1])
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        whole["choices"][0]["message"]["content"]


def test_max_tokens_defaults(served, model):
    """Left out, a chat runs to the end of the context (max_len 128 less its prompt, as
    OpenAI's chat API) and a completion stops at 16 tokens (OpenAI's default there)."""
    server, _ = served
    messages = [{"role": "user", "content": "Tuples are"}]
    chat = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json={
        "model": NAME, "messages": messages, "temperature": 0, "ignore_eos": True}).json()
    prompt = len(model.tokenizer.encode(model.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True), add_special_tokens=False))
    assert chat["usage"]["prompt_tokens"] == prompt
    assert chat["usage"]["completion_tokens"] == 128 - prompt
    assert chat["choices"][0]["finish_reason"] == "length"
    completion = httpx.post(server.url + "/v1/completions", headers=AUTH, json={
        "model": NAME, "prompt": "The list type", "temperature": 0, "ignore_eos": True}).json()
    assert completion["usage"]["completion_tokens"] == 16


def test_stop_strings_and_token_prompts(served, model):
    server, _ = served
    url = server.url + "/v1/completions"
    body = {"model": NAME, "prompt": "The list type", "max_tokens": 12, "temperature": 0}
    text = httpx.post(url, json=body, headers=AUTH).json()["choices"][0]["text"]
    stop = text.split()[2]  # a word in the middle
    cut = httpx.post(url, json=body | {"stop": [stop, "zzz"]}, headers=AUTH).json()
    assert cut["choices"][0] == {"index": 0, "text": text[:text.index(stop)], "logprobs": None,
                                 "finish_reason": "stop"}
    ids = model.tokenizer.encode("The list type")
    by_ids = httpx.post(url, json=body | {"prompt": ids}, headers=AUTH).json()
    assert by_ids["choices"][0]["text"] == text


# ----- errors -----------------------------------------------------------------------

def test_errors_in_openai_shape(served):
    server, _ = served
    url = server.url + "/v1/completions"
    body = {"model": NAME, "prompt": "The list type", "max_tokens": 4}
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # open
    check_error(httpx.post(url, json=body), 401, "invalid_api_key")
    check_error(httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer no"}),
                401, "invalid_api_key")
    check_error(httpx.post(url, json=body | {"n": 2}, headers=AUTH), 400, param="n")
    assert "temperature" in check_error(
        httpx.post(url, json=body | {"temperature": -1}, headers=AUTH), 400)
    check_error(httpx.post(url, json=body | {"temperature": "hot"}, headers=AUTH), 400,
                param="temperature")
    check_error(httpx.post(url, json=body | {"logit_bias": {"5": 1}}, headers=AUTH), 400,
                param="logit_bias")
    check_error(httpx.post(url, json=body | {"best_of": 3, "max_tokens": 4}, headers=AUTH), 400,
                param="best_of")
    check_error(httpx.post(url, json=body | {"mystery": 1}, headers=AUTH), 400, param="mystery")
    check_error(httpx.post(url, json=body | {"max_tokens": "4"}, headers=AUTH), 400,
                param="max_tokens")
    check_error(httpx.post(url, json=body | {"stop": 5}, headers=AUTH), 400, param="stop")
    assert "stop" in check_error(httpx.post(url, json=body | {"stop": [""]}, headers=AUTH), 400)
    check_error(httpx.post(url, json=body | {"model": "gpt-5"}, headers=AUTH), 404,
                "model_not_found", "model")
    assert "max_len" in check_error(
        httpx.post(url, json=body | {"max_tokens": 500}, headers=AUTH), 400)
    check_error(httpx.post(url, content=b"{not json", headers=AUTH), 400)
    check_error(httpx.post(url, json=body | {"prompt": "x" * (5 << 20)}, headers=AUTH), 413,
                "request_too_large")
    check_error(httpx.post(url, json=body | {"max_tokens": 0}, headers=AUTH), 400)
    check_error(httpx.post(server.url + "/v1/chat/completions", headers=AUTH,
                           json={"model": NAME}), 400, param="messages")
    check_error(httpx.post(server.url + "/v1/chat/completions", headers=AUTH,
                           json={"model": NAME, "messages": [{"role": "robot", "content": "x"}]}),
                400)
    check_error(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [NAME]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="x")
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=NAME, prompt="x", n=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) \
            .completions.create(model=NAME, prompt="x")


# ----- metrics ----------------------------------------------------------------------

def test_metrics_parse_and_count(served):
    server, engine = served
    before = scrape(server.url)
    prompt = " ".join(SUBJECTS)  # more than two blocks of tokens
    body = {"model": NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    usages = [httpx.post(server.url + "/v1/completions", json=body, headers=AUTH).json()["usage"]
              for _ in range(2)]
    after = scrape(server.url)
    delta = lambda name: after[name] - before.get(name, 0)
    assert delta("kvjax_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("kvjax_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 32 and usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert delta("kvjax_cached_prompt_tokens_total") == cached
    assert delta("kvjax_requests_finished_total") == 2
    # one after the other: each prefills what is not cached, then 5 decode steps
    assert delta("kvjax_engine_prefill_tokens_total") == sum(
        u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert delta("kvjax_engine_decode_steps_total") == 10
    assert delta("kvjax_engine_steps_total") >= 10
    assert delta("kvjax_engine_step_seconds_total") > 0
    for histogram in ("kvjax_time_to_first_token_seconds", "kvjax_e2e_request_latency_seconds",
                      "kvjax_time_per_output_token_seconds", "kvjax_request_queue_time_seconds"):
        assert delta(f"{histogram}_count") == 2, histogram
    # every gap between two tokens of a request: 5 a request
    assert delta("kvjax_inter_token_latency_seconds_count") == sum(
        u["completion_tokens"] - 1 for u in usages) == 10
    assert delta("kvjax_inter_token_latency_seconds_sum") > 0
    assert after["kvjax_prefix_cache_hit_rate"] == pytest.approx(
        engine.stats()["prefix_cache"]["hit_rate"])
    assert after["kvjax_kv_blocks_total"] == ENGINE["pool_blocks"]
    assert after["kvjax_kv_cache_usage_ratio"] == 0
    assert after["kvjax_rows_total"] == 8 and after["kvjax_requests_waiting"] == 0
    assert {"kvjax_prefix_cache_evictions_total{tier=device}",
            "kvjax_prefix_cache_evictions_total{tier=host}", "kvjax_requests_refused_total",
            "kvjax_kv_pool_bytes", "kvjax_kv_blocks_cached"} <= set(after)
    info = next(k for k in after if k.startswith("kvjax_engine_info"))
    assert f"{{model={NAME}}}" in info and "{device=" in info


# ----- a small engine: a full queue, shutdowns --------------------------------------

def start_in_turn(clients: list[threading.Thread], engine: Engine) -> None:
    """Starts the first client, and once its request runs the second, which waits (the
    queue holds one: sent at once, the second could find the first still queued)."""
    clients[0].start()
    wait_until(lambda: engine.stats()["rows_running"] == 1)
    clients[1].start()
    wait_until(lambda: engine.stats()["requests_waiting"] == 1)


def small_server(model, **options) -> tuple[BackgroundServer, Engine]:
    """A server of one row and a queue of one, whose requests may be long enough (1000
    tokens, a few seconds) to be surely running when a test needs them to."""
    engine = Engine(model, max_rows=1, max_waiting=1, **ENGINE | {"max_len": 1024})
    return BackgroundServer(create_app(engine, model_name=NAME), **options).start(), engine


def test_a_client_that_leaves_frees_its_row_and_blocks(model):
    server, engine = small_server(model)
    try:
        long = {"model": NAME, "prompt": "The list type", "max_tokens": 1000, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions",
                          json=long | {"stream": True}, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it runs
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed request given up
            httpx.post(server.url + "/v1/completions", json=long, timeout=0.3)
        wait_until(lambda: engine.stats()["requests_cancelled"] == 2)
        stats = engine.stats()
        assert stats["rows_running"] == stats["pool_blocks_used"] == 0
        assert stats["generation_tokens"] < 2 * 1000
        metrics = scrape(server.url)
        assert metrics["kvjax_requests_running"] == metrics["kvjax_kv_blocks_used"] == 0
        assert metrics["kvjax_requests_cancelled_total"] == 2
    finally:
        server.stop()


def test_a_full_queue_answers_429(model):
    server, engine = small_server(model)
    try:
        running = engine.submit("The list type", max_tokens=1000, stop_tokens=[])
        wait_until(lambda: engine.stats()["rows_running"] == 1)
        waiting = engine.submit("Tuples are", max_tokens=4)
        body = {"model": NAME, "prompt": "A module is", "max_tokens": 4}
        response = httpx.post(server.url + "/v1/completions", json=body)
        assert "queue is full" in check_error(response, 429, "queue_full")
        assert response.headers["retry-after"] == "1"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(**body)
        assert engine.stats()["requests_refused"] == 2
        running.cancel()
        assert waiting.result(timeout=30).finish_reason in ("stop", "length")
    finally:
        server.stop()


def test_shutdown_lets_requests_in_flight_finish(model):
    server, engine = small_server(model)
    body = {"model": NAME, "max_tokens": 300, "ignore_eos": True, "stream": True}
    results = {}

    def stream(prompt):  # the first runs, the second waits for its row
        results[prompt] = httpx.post(server.url + "/v1/completions", timeout=60,
                                     json=body | {"prompt": prompt}).text

    clients = [threading.Thread(target=stream, args=(p,)) for p in ("Tuples are", "A module is")]
    start_in_turn(clients, engine)
    server.stop(timeout=60)
    for client in clients:
        client.join(timeout=60)
    for text in results.values():
        chunks = events(text)[:-1]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(results) == 2 and engine.stats()["requests_finished"] == 2
    with pytest.raises(httpx.ConnectError):
        httpx.post(server.url + "/v1/completions", json=body)
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit("x")


def test_shutdown_past_its_timeout_cancels_the_rest(model):
    server, engine = small_server(model, timeout_graceful_shutdown=0.1)
    body = {"model": NAME, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    complete = {}

    def stream(prompt):
        try:
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                              json=body | {"prompt": prompt}) as response:
                complete[prompt] = "data: [DONE]" in list(response.iter_lines())
        except httpx.HTTPError:  # the connection closed mid-stream
            complete[prompt] = False

    prompts = ("Tuples are", "A module is")  # the first runs, the second waits for its row
    clients = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    start_in_turn(clients, engine)
    server.stop(timeout=60)
    for client in clients:
        client.join(timeout=60)
    stats = engine.stats()
    assert complete == dict.fromkeys(prompts, False)
    assert stats["requests_cancelled"] == 2
    assert stats["rows_running"] == stats["pool_blocks_used"] == stats["requests_waiting"] == 0


# ----- the command line and the load generator -----------------------------------------

def test_cli_builds_the_engine_its_flags_describe(model):
    # no persistent compile cache: it would stay on for the rest of the test process
    args = cli.parse_args(["--max-rows", "2", "--max-len", "128", "--pool-blocks", "20",
                           "--host-cache-mb", "1", "--eviction", "lfu", "--port", "0",
                           "--no-compile-cache"])
    engine = cli.build_engine(args)
    stats = engine.stats()
    assert (engine.max_rows, engine.max_len, stats["pool_blocks_total"]) == (2, 128, 20)
    assert stats["prefix_cache"]["blocks"]["host"]["total"] == 2 ** 20 // stats[
        "prefix_cache"]["block_bytes"]
    assert cli.model_name(args) == NAME
    with pytest.raises(SystemExit):
        cli.parse_args(["--pool-mb", "1", "--pool-blocks", "2"])


def load_generator():
    """``benchmarks/serving_benchmark.py`` as a module."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import serving_benchmark
    finally:
        sys.path.pop(0)
    return serving_benchmark


def test_load_generator(served, tmp_path):
    server, _ = served
    out = tmp_path / "run.json"
    assert load_generator().main([
        "--url", server.url, "--api-key", KEY, "--requests", "8", "--concurrency", "2",
        "--prompt-len", "16", "--output-len", "8", "--shared-prefix", "32",
        "--json", str(out), "--no-plot"]) == 0
    run = json.loads(out.read_text())
    summary = run["summary"]
    assert summary["failed"] == 0 and summary["requests"] == 8
    assert summary["output_tokens"] == sum(r["max_tokens"] for r in run["records"])
    assert summary["prefix_hit_rate"] > 0 and summary["client_cached_tokens"] > 0
    for name in ("ttft", "itl", "tpot", "e2e"):
        assert 0 < summary[name]["p50_ms"] <= summary[name]["p99_ms"]
    assert run["device"] and run["versions"]["python"] and run["date"]


def test_load_generator_in_process(tmp_path):
    """--in-process builds the engine in the load generator's process and submits to it
    directly: the records and engine metrics a server run gives, with no HTTP. (It sets
    up JAX in this process as kvjax-serve would: no compile cache, for the tests after.)"""
    out = tmp_path / "run.json"
    assert load_generator().main([
        "--random-shape", "bundled", "--in-process", "--server-args",
        "--max-rows 2 --max-len 64 --max-prefill-tokens 16 --dtype float32 --no-compile-cache",
        "--requests", "4", "--prompt-len", "8", "--output-len", "4", "--len-sigma", "0",
        "--shared-prefix", "16", "--json", str(out), "--no-plot"]) == 0
    run = json.loads(out.read_text())
    summary = run["summary"]
    assert summary["failed"] == 0 and summary["output_tokens"] == 16
    assert [len(r["chunk_times"]) for r in run["records"]] == [4] * 4
    # the 16 shared tokens are one block: computed once, then served from the pool
    assert summary["prefix_hit_rate"] == 3 * 16 / (4 * 24)
    assert summary["client_cached_tokens"] == 3 * 16
    assert summary["engine"]["decode_steps"] > 0 and run["server"]["model"] == "bundled-random"
    assert run["warmup_s"] > 0
    assert not kvjax.compilation_cache.in_use()
    with pytest.raises(SystemExit):
        load_generator().main(["--in-process", "--url", "http://127.0.0.1:1"])


def test_load_generator_starts_its_server(tmp_path):
    """Without --url the load generator serves a random-weight shape from a child process
    (text from the numbered tokenizer) and times a static generate baseline there."""
    out = tmp_path / "run.json"
    assert load_generator().main([
        "--random-shape", "bundled", "--server-args",
        "--max-rows 2 --max-len 64 --max-prefill-tokens 16 --dtype float32",
        "--requests", "3", "--prompt-len", "8", "--output-len", "4", "--len-sigma", "0",
        "--static-baseline", "--json", str(out), "--no-plot"]) == 0
    run = json.loads(out.read_text())
    assert run["summary"]["failed"] == 0 and run["summary"]["output_tokens"] == 12
    assert run["server"]["model"] == "bundled-random"
    baseline = run["static_baseline"]
    assert (baseline["batch"], baseline["prompt_tokens"], baseline["new_tokens"]) == (2, 8, 4)
    assert baseline["output_tokens_per_s"] > 0 and run["warmup_s"] > 0
