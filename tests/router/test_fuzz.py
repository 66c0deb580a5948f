"""Property test: random JSON bodies at both generation endpoints never produce a 5xx, and the router
(and its backend) stays healthy afterwards."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.router.conftest import RunningRouter

FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "n", "seed", "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "min_tokens", "ignore_eos",
    "include_stop_str_in_output", "user", "stream", "stream_options", "echo", "best_of", "suffix",
    "response_format", "skip_special_tokens", "add_generation_prompt",
]  # fmt: skip

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values},
        optional={"content": st.text(max_size=40) | json_values, "name": json_values},
    ),
    max_size=3,
)
small_numbers = st.integers(-3, 40) | st.floats(-3, 3) | st.none()
field_values = {
    "model": st.sampled_from(["baton-test", "other"]) | json_values,
    "messages": messages | json_values,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 500), max_size=8) | json_values,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | json_values,
    "logit_bias": st.dictionaries(st.integers(-2, 500).map(str), st.floats(-150, 150), max_size=3)
    | json_values,
}
random_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={name: field_values.get(name, small_numbers | json_values) for name in FIELDS},
    ),
)
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
VALID = {
    CHAT: {"model": "baton-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    COMP: {"model": "baton-test", "prompt": "hi", "max_tokens": 8},
}
plausible = (
    st.integers(-2, 24)
    | st.floats(-0.5, 2.5, allow_nan=False)
    | st.booleans()
    | st.none()
    | st.text(max_size=4)
    | st.lists(st.text(max_size=3), max_size=2)
    | st.fixed_dictionaries({"include_usage": st.booleans()})
)
# A valid request with a few fields changed to plausible values: reaches generation often.
mutated = st.sampled_from([CHAT, COMP]).flatmap(
    lambda path: st.tuples(
        st.just(path),
        st.dictionaries(st.sampled_from(FIELDS), plausible, max_size=3).map(
            lambda upd: {**VALID[path], **upd}
        ),
    )
)
requests = st.tuples(st.sampled_from([CHAT, COMP]), random_bodies) | mutated


def post(router: RunningRouter, path: str, body) -> int:
    raw = json.dumps(body)  # NaN / Infinity are emitted as such: the server must cope
    if isinstance(body, dict) and body.get("stream") is True:
        with router.http.stream("POST", router.url + path, content=raw) as resp:
            for _ in resp.iter_bytes():
                pass
            return resp.status_code
    return router.http.post(router.url + path, content=raw).status_code


def test_random_bodies_never_5xx_and_router_stays_healthy(router: RunningRouter) -> None:
    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(request=requests)
    def fuzz(request) -> None:
        path, body = request
        status = post(router, path, body)
        assert status < 500, (path, body)

    fuzz()
    assert router.http.get(router.url + "/health").status_code == 200
    ok = router.http.post(
        router.url + "/v1/completions", json={"model": "baton-test", "prompt": "x", "max_tokens": 3}
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    # Every sequence the fuzzer started finished or was aborted: nothing is left running.
    started = {r.request_id for r in router.backend.requests}
    assert started == set(router.backend.finished) | set(router.backend.aborted)
