"""The same behaviour tests for every local backend: HFBackend in process, and OpenAIBackend
talking to a real `dynaplan serve` subprocess on 127.0.0.1 (both over the tiny random model)."""

from __future__ import annotations

import math

import pytest

from dynaplan.models.base import Backend, GenerationRequest, SamplingParams
from dynaplan.models.hf import HFBackend

from backend_harness import ServerProcess, build_eager_model

LT = 44  # "<", the first token of "<plan>" with the SmolLM2 tokenizer
EOS = 2  # <|im_end|>
SYSTEM = {"role": "system", "content": "You play a text game. Answer with one action: Noop, Do, Move West."}


def _requests() -> list[GenerationRequest]:
    return [
        GenerationRequest([SYSTEM, {"role": "user", "content": "You see a tree to the west."}]),
        GenerationRequest([SYSTEM, {"role": "user", "content": "You see water. " * 3}], prefix="<plan>\n"),
        GenerationRequest([SYSTEM, {"role": "user", "content": "Nothing here."}], forbid_plan=True),
        GenerationRequest([{"role": "user", "content": "No system message at all."}]),
    ]


@pytest.fixture(scope="module")
def eager_model_dir(tiny_model_dir, tmp_path_factory):
    # "<" first, then the stop token: with the plan ban the answer must be empty and stop
    return build_eager_model(tiny_model_dir, tmp_path_factory.mktemp("eager") / "model", {LT: 60.0, EOS: 40.0})


@pytest.fixture(scope="module", autouse=True)
def _server_process(tiny_model_dir, eager_model_dir):
    """One `dynaplan serve` subprocess serving both test models, launched when the module starts
    so that its start-up (seconds of imports) overlaps the in-process tests."""
    proc = ServerProcess(tiny_model_dir, eager_model_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server(_server_process):
    return _server_process.wait_ready()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return HFBackend(tiny_model_dir)


@pytest.fixture(scope="module")
def _made():
    made: dict = {}
    yield made
    for backend in made.values():
        if hasattr(backend, "close"):
            backend.close()


# function-scoped on purpose: module-scoped parametrisation would reorder the tests, and the
# last test of this file must run last (it kills the server)
@pytest.fixture(params=["hf", "openai"])
def make_backend(request, _made):
    def make(model_dir) -> Backend:
        key = (request.param, str(model_dir))
        if key not in _made:
            if request.param == "hf":
                _made[key] = HFBackend(model_dir)
            else:
                from dynaplan.models.openai import OpenAIBackend

                server = request.getfixturevalue("server")
                _made[key] = OpenAIBackend(server.url, str(model_dir), max_retries=1, backoff_s=0.1, concurrency=4)
        return _made[key]

    return make


@pytest.fixture
def backend(make_backend, tiny_model_dir):
    return make_backend(tiny_model_dir)


def test_generations_are_well_formed(backend, reference):
    requests = _requests()
    gens = backend.generate(requests, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6), seed=1)
    assert len(gens) == len(requests)
    for request, gen in zip(requests, gens):
        assert isinstance(backend, Backend)
        assert gen.prompt_token_ids == reference.prompt_token_ids(request)
        assert gen.text.startswith(request.prefix)
        assert 1 <= len(gen.token_ids) == len(gen.logprobs) <= 6
        assert all(math.isfinite(lp) and lp <= 0 for lp in gen.logprobs)
        assert gen.finish_reason == ("stop" if gen.token_ids[-1] in reference.stop_ids else "length")
        assert not gen.text[len(request.prefix) :].lstrip().startswith("<plan>") or not request.forbid_plan


def test_seeded_sampling_is_deterministic(backend):
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=5)
    a = backend.generate(_requests(), sampling, seed=7)
    b = backend.generate(_requests(), sampling, seed=7)
    c = backend.generate(_requests(), sampling, seed=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_agrees_with_hf_reference_and_its_scores(backend, reference, temperature):
    sampling = SamplingParams(temperature=temperature, top_p=0.95, max_new_tokens=5)
    gens = backend.generate(_requests(), sampling, seed=3)
    want = reference.generate(_requests(), sampling, seed=3)
    scored = reference.score([g.prompt_token_ids for g in gens], [g.token_ids for g in gens], temperature=temperature)
    for gen, ref, s in zip(gens, want, scored):
        assert gen.token_ids == ref.token_ids
        assert gen.text == ref.text
        assert max(abs(a - b) for a, b in zip(gen.logprobs, s)) < 1e-3


def test_forbid_plan_and_stop_token(make_backend, eager_model_dir):
    backend = make_backend(eager_model_dir)
    free, banned, prefixed = backend.generate(
        [
            GenerationRequest([SYSTEM, {"role": "user", "content": "go"}]),
            GenerationRequest([SYSTEM, {"role": "user", "content": "go"}], forbid_plan=True),
            GenerationRequest([SYSTEM, {"role": "user", "content": "go"}], prefix="Move"),
        ],
        SamplingParams(temperature=1.0, max_new_tokens=4),
        seed=0,
    )
    assert free.token_ids == [LT] * 4 and free.text == "<<<<" and free.finish_reason == "length"
    # the ban removes "<", so the next favourite, the stop token, ends the answer at once
    assert banned.token_ids == [EOS] and banned.text == "" and banned.finish_reason == "stop"
    assert prefixed.text == "Move<<<<" and prefixed.prompt_token_ids[-1] != LT


def test_count_tokens(backend):
    assert backend.count_tokens("<plan>") == 3
    assert backend.count_tokens("Move West") == 2


# ---- server and client errors (openai only; the last test kills the shared server) ------------


def test_server_lists_models_and_rejects_bad_requests(server, tiny_model_dir):
    import httpx

    from dynaplan.models.openai import BackendError, OpenAIBackend

    listed = httpx.get(f"{server.url}/models").json()
    assert [m["id"] for m in listed["data"]] == server.model_dirs
    msgs = [{"role": "user", "content": "hi"}]
    bad = httpx.post(f"{server.url}/chat/completions", json={"messages": msgs, "continue_final_message": True, "add_generation_prompt": False})
    assert bad.status_code == 400 and "assistant" in bad.text
    # logit_bias is honoured at every position, as vLLM does
    biased = httpx.post(
        f"{server.url}/chat/completions",
        json={"model": str(tiny_model_dir), "messages": msgs, "max_tokens": 3, "logit_bias": {str(LT): 100}, "return_token_ids": True},
    ).json()
    assert biased["choices"][0]["token_ids"] == [LT] * 3
    client = OpenAIBackend(server.url, "no-such-model", tokenizer=tiny_model_dir, max_retries=3)
    with pytest.raises(BackendError, match="404"):  # a 4xx is not retried
        client.generate(_requests()[:1], SamplingParams(max_new_tokens=2), seed=0)
    client.close()


def test_killing_the_server_mid_run_gives_a_clear_error(server, tiny_model_dir):
    import threading
    import time

    from dynaplan.models.openai import BackendUnavailable, OpenAIBackend

    client = OpenAIBackend(server.url, str(tiny_model_dir), max_retries=2, backoff_s=0.2, concurrency=2)
    client.generate(_requests()[:1], SamplingParams(max_new_tokens=2), seed=0)  # alive
    threading.Timer(0.5, server.stop).start()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        for _ in range(50):  # generations in flight and after the kill
            client.generate(_requests(), SamplingParams(temperature=1.0, max_new_tokens=40), seed=0)
    assert time.monotonic() - started < 60
    message = str(info.value)
    assert f"could not reach {server.url}/chat/completions after 2 retries" in message
    assert "connection refused" in message or "disconnected" in message.lower() or "closed" in message.lower()
    client.close()
