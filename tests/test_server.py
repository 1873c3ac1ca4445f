"""The HTTP server through the official ``openai`` client, over real HTTP on 127.0.0.1.

A tiny Llama with a real tokenizer over JSON characters serves; uvicorn runs in a thread. Covers
completions and chat, a JSON-schema response_format whose output validates, bad requests (unknown
model, n_particles 0, malformed schema, prompt longer than the context, a client that disconnects
mid-request, an engine error) each answered clearly and followed by a working request, and the
/health and /metrics endpoints.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
import torch
import uvicorn
from test_engine import lm_with_tokenizer

from smcgen import Engine, Potential, SequenceBatch
from smcgen.server import create_app

SCHEMA = {
    "type": "object",
    "properties": {"a": {"enum": ["ab", "ba"]}, "b": {"type": "string", "maxLength": 3}},
    "required": ["a", "b"],
}
BOOM = 0  # a prompt starting with this token ('{') makes the test potential fail


class FailsOnBoom(Potential):
    """Psi = 1, except that it raises for prompts starting with '{': a stand-in for an engine failure."""

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        if batch.prompt_ids and batch.prompt_ids[0] == BOOM:
            raise RuntimeError("the potential failed on this prompt")
        return torch.zeros(len(batch.token_ids), dtype=torch.float64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    lm = lm_with_tokenizer(0)
    engine = Engine(lm, potentials=FailsOnBoom(), n_particles=4, max_new_tokens=16, target_temperature=0.8)
    app = create_app(engine, "tiny", max_queue=64, max_batch=4)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def assert_works(client: openai.OpenAI) -> None:
    """A plain request after an error still gets an answer."""
    out = client.completions.create(model="tiny", prompt="ab", max_tokens=6, seed=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens == len(out.choices[0].text) + (out.choices[0].finish_reason == "stop")


def test_completion_with_smc_settings(client):
    out = client.completions.create(
        model="tiny", prompt="ab", max_tokens=8, seed=3, extra_body={"n_particles": 6, "alpha": 2.0}
    )
    choice = out.choices[0]
    smc = choice.model_extra["smc"]
    assert smc["n_particles"] == 6 and smc["engine"] == "generic"
    assert 1 <= len(choice.text) <= 8
    assert out.usage.prompt_tokens == 2
    again = client.completions.create(
        model="tiny", prompt="ab", max_tokens=8, seed=3, extra_body={"n_particles": 6, "alpha": 2.0}
    )
    assert again.choices[0].text == choice.text  # seeded requests reproduce through the server


def test_several_prompts_give_one_choice_each(client):
    out = client.completions.create(model="tiny", prompt=["ab", "ba", "abab"], max_tokens=5)
    assert [c.index for c in out.choices] == [0, 1, 2]


def test_chat_with_json_schema_response_format_validates(client):
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "a"}, {"role": "user", "content": "b"}],
        max_tokens=24,
        seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}},
    )
    content = out.choices[0].message.content
    jsonschema.validate(json.loads(content), SCHEMA)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].model_extra["smc"]["n_alive"] >= 1


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_bad_requests_get_clear_4xx_and_the_server_goes_on(client):
    err = error_of(lambda: client.completions.create(model="nope", prompt="ab", max_tokens=4))
    assert err.status_code == 404 and err.body["param"] == "model" and "tiny" in err.body["message"]
    assert_works(client)

    err = error_of(lambda: client.completions.create(model="tiny", prompt="ab", extra_body={"n_particles": 0}))
    assert err.status_code == 400 and err.body["param"] == "n_particles"
    assert "greater than or equal to 1" in err.body["message"]
    assert_works(client)

    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    err = error_of(
        lambda: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "a"}], response_format=bad_schema
        )
    )
    assert err.status_code == 400 and err.body["param"] == "response_format" and "objekt" in err.body["message"]
    assert_works(client)

    err = error_of(lambda: client.completions.create(model="tiny", prompt="a" * 70, max_tokens=4))
    assert err.status_code == 400 and err.body["param"] == "prompt" and "context" in err.body["message"]
    err = error_of(lambda: client.completions.create(model="tiny", prompt="ab", max_tokens=63))
    assert err.status_code == 400 and err.body["param"] == "max_tokens"
    assert_works(client)

    err = error_of(lambda: client.completions.create(model="tiny", prompt="ab", extra_body={"n_partcles": 4}))
    assert err.status_code == 400 and err.body["param"] == "n_partcles"  # a typo is named, not ignored
    err = error_of(lambda: client.completions.create(model="tiny", prompt="ab", temperature=0))
    assert err.status_code == 400 and err.body["param"] == "temperature"
    message = err.body["message"]
    assert "greedy decoding" in message and "0.1" in message and message.count("temperature 0") == 1, message
    err = error_of(lambda: client.completions.create(model="tiny", prompt="ab", n=2))
    assert err.status_code == 400 and err.body["param"] == "n"
    assert_works(client)


def test_engine_error_is_a_500_and_the_server_goes_on(client):
    err = error_of(lambda: client.completions.create(model="tiny", prompt="{ab", max_tokens=4))
    assert err.status_code == 500 and "the potential failed" in err.body["message"]
    assert_works(client)


def test_client_disconnecting_mid_request_does_not_break_the_next(server, client):
    # 4096 particles: long enough (~0.5 s on a CPU) that a 0.05 s client timeout always cuts it,
    # even when every particle reaches EOS after a few tokens
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 40, "n_particles": 4096}
    for _ in range(3):  # queued ones are dropped, a running one finishes unseen
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server}/v1/completions", json=body, timeout=0.05)
    assert_works(client)


def test_health_and_metrics(server, client):
    assert_works(client)
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["engine"] == "generic"
    text = httpx.get(f"{server}/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert samples['smcgen_requests_total{endpoint="completions",code="200"}'] >= 1
    assert samples["smcgen_completion_tokens_total"] >= 1
    assert samples["smcgen_particle_tokens_total"] >= samples["smcgen_completion_tokens_total"]
    assert samples['smcgen_tokens_per_second{kind="answer"}'] > 0
    assert samples["smcgen_queue_depth"] == 0
    assert 0 < samples["smcgen_final_ess_fraction_sum"] <= samples["smcgen_final_ess_fraction_count"]
    models = openai.OpenAI(base_url=f"{server}/v1", api_key="unused").models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.parametrize("continuous", [False, True])
def test_scheduler_batches_waiting_requests_seeded_or_not(continuous):
    """Requests waiting together share one native batch, whatever their prompt lengths: one engine
    call (``continuous=False``) or the engine's request slots, joining between cycles; a seeded one
    keeps its own stream (its output does not depend on other traffic)."""
    import asyncio

    from smcgen.server.metrics import ServerMetrics
    from smcgen.server.scheduler import Scheduler

    engine = Engine(
        lm_with_tokenizer(0), engine="native", n_particles=4, block_size=1, max_new_tokens=6, continuous=continuous
    )
    requests = [engine.resolve(p) for p in ("ab", "ba", "abab")] + [engine.resolve("ab", seed=7)]

    async def scenario():
        metrics = ServerMetrics()
        scheduler = Scheduler(engine, metrics, max_queue=8, max_batch=8)
        scheduler.start()
        futures = [scheduler.submit(r) for r in requests]  # all queued before the worker runs
        results = await asyncio.gather(*futures)
        await scheduler.stop()
        return results, metrics

    results, metrics = asyncio.run(scenario())
    if continuous:  # each answer reported as it left its slot
        assert metrics.batches == 4 and engine.batcher.stats["admitted"] == 4
    else:
        assert metrics.batches == 1  # all four requests in one native run
    assert (
        engine.stats["native_requests"] == 4 and engine.stats["native_engines_built"] == 1
    )  # one per setting, any seed
    alone = engine("ab", seed=7)
    assert results[3].sequences == alone.sequences and results[3].text == alone.text
    assert all(r.engine == "native" for r in results)


def test_streaming_through_the_openai_client(client):
    """stream: true gives OpenAI chunks whose text adds up to the unstreamed answer (same seed)."""
    kwargs = {"model": "tiny", "prompt": "ab", "max_tokens": 16, "seed": 0, "extra_body": {"ess_threshold": 1.0}}
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert all(c.object == "text_completion" for c in chunks)
    assert any(c.choices[0].text for c in chunks[1:-1]), "no text streamed before the end"
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "ab"}], "max_tokens": 12, "seed": 1}
    answer = client.chat.completions.create(**chat).choices[0].message.content
    parts = list(client.chat.completions.create(stream=True, **chat))
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(p.choices[0].delta.content or "" for p in parts) == answer
    assert_works(client)


def test_a_stream_reports_an_engine_error_and_the_server_goes_on(client):
    with pytest.raises(openai.APIError, match="the engine failed"):
        list(client.completions.create(model="tiny", prompt=[BOOM, 1], max_tokens=4, stream=True))
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        client.completions.create(model="tiny", prompt=["ab", "ba"], max_tokens=4, stream=True)
    assert_works(client)
