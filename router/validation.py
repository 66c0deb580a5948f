"""Request validation, before any work: every rule raises a 400/404 ``RouterError`` naming its field.

Two phases, because the context checks need the token count:
1. ``check_sampling`` — ranges and cross-field rules on the parsed body (cheap, before tokenizing);
2. ``resolve_max_tokens`` — prompt length against the context window, after tokenizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import ValidationError

from router.errors import RouterError, invalid, model_not_found
from router.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRING_CHARS = 1024
LOGIT_BIAS_LIMIT = 100.0


@dataclass(frozen=True)
class Limits:
    max_n: int
    max_logprobs: int
    max_stop_strings: int
    vocab_size: int


def pydantic_error(err: ValidationError) -> RouterError:
    """The first field error of a body that did not parse into the request model."""
    first = err.errors()[0]
    loc = first.get("loc") or ()
    param = str(loc[0]) if loc else None
    where = ".".join(str(p) for p in loc)
    return invalid(f"Invalid value for `{where}`: {first.get('msg', 'invalid')}", param, code="invalid_type")


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise model_not_found(requested)


def _finite(value: float | None, param: str) -> None:
    if value is not None and not math.isfinite(value):
        raise invalid(f"`{param}` must be a finite number, got {value}.", param)


def _in_range(value: float | None, param: str, low: float, high: float, *, low_open: bool = False) -> None:
    if value is None:
        return
    _finite(value, param)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        lo = "(" if low_open else "["
        raise invalid(f"`{param}` must be in {lo}{low}, {high}], got {value}.", param)


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def check_sampling(req: SamplingFields, limits: Limits, n_prompts: int = 1) -> None:
    """Ranges shared by chat and completions. ``n_prompts`` is the batch size of a completions call."""
    if req.temperature is not None:
        _finite(req.temperature, "temperature")
        if req.temperature < 0:
            raise invalid(f"`temperature` must be >= 0, got {req.temperature}.", "temperature")
    _in_range(req.top_p, "top_p", 0.0, 1.0, low_open=True)
    if req.top_k is not None and req.top_k < -1:
        raise invalid(f"`top_k` must be -1 (disabled) or >= 0, got {req.top_k}.", "top_k")
    _in_range(req.min_p, "min_p", 0.0, 1.0)
    _in_range(req.presence_penalty, "presence_penalty", -2.0, 2.0)
    _in_range(req.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    if req.repetition_penalty is not None:
        _finite(req.repetition_penalty, "repetition_penalty")
        if req.repetition_penalty <= 0:
            raise invalid(
                f"`repetition_penalty` must be > 0, got {req.repetition_penalty}.", "repetition_penalty"
            )
    n = 1 if req.n is None else req.n
    if n < 1 or n * n_prompts > limits.max_n:
        raise invalid(
            f"`n` must be in [1, {limits.max_n // max(n_prompts, 1)}] for this request, got {n}.", "n"
        )
    if req.seed is not None and not _INT64_MIN <= req.seed <= _INT64_MAX:
        raise invalid("`seed` must fit in a signed 64-bit integer.", "seed")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise invalid(f"`max_tokens` must be >= 1, got {req.max_tokens}.", "max_tokens")
    if req.min_tokens is not None:
        if req.min_tokens < 0:
            raise invalid(f"`min_tokens` must be >= 0, got {req.min_tokens}.", "min_tokens")
    stops = stop_strings(req.stop)
    if len(stops) > limits.max_stop_strings:
        raise invalid(f"At most {limits.max_stop_strings} stop strings are allowed.", "stop")
    if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in stops):
        raise invalid(
            f"Stop strings must be non-empty and at most {MAX_STOP_STRING_CHARS} characters.", "stop"
        )
    for token_id in req.stop_token_ids or ():
        _check_token_id(token_id, limits.vocab_size, "stop_token_ids")
    for key, bias in (req.logit_bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise invalid(f"`logit_bias` keys must be token ids, got {key!r}.", "logit_bias") from None
        _check_token_id(token_id, limits.vocab_size, "logit_bias")
        _in_range(bias, "logit_bias", -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)


def _check_token_id(token_id: int, vocab_size: int, param: str) -> None:
    if not 0 <= token_id < vocab_size:
        raise invalid(f"Token id {token_id} in `{param}` is out of the vocabulary [0, {vocab_size}).", param)


def check_chat(req: ChatCompletionRequest, limits: Limits) -> None:
    check_sampling(req, limits)
    if not req.messages:
        raise invalid("`messages` must contain at least one message.", "messages")
    for i, message in enumerate(req.messages):
        if message.role not in ("system", "developer", "user", "assistant", "tool"):
            raise invalid(f"Unknown role {message.role!r} in messages[{i}].", f"messages[{i}].role")
        if isinstance(message.content, list):
            for part in message.content:
                if part.type != "text" or part.text is None:
                    raise invalid(
                        f"Only text content parts are supported (messages[{i}] has {part.type!r}).",
                        f"messages[{i}].content",
                    )
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise invalid("`max_completion_tokens` must be >= 1.", "max_completion_tokens")
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= limits.max_logprobs:
            raise invalid(f"`top_logprobs` must be in [0, {limits.max_logprobs}].", "top_logprobs")
        if req.top_logprobs > 0 and not req.logprobs:
            raise invalid("`top_logprobs` requires `logprobs` to be true.", "top_logprobs")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise invalid(f"response_format {fmt!r} is not supported.", "response_format")


def check_completion(req: CompletionRequest, limits: Limits) -> None:
    prompt = req.prompt
    n_prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    check_sampling(req, limits, n_prompts=n_prompts)
    if prompt == "" or prompt == []:
        raise invalid("`prompt` must not be empty.", "prompt")
    if isinstance(prompt, list):
        for item in prompt:
            if isinstance(item, int):
                _check_token_id(item, limits.vocab_size, "prompt")
            elif isinstance(item, list):
                if not item:
                    raise invalid("`prompt` must not contain an empty token list.", "prompt")
                for token_id in item:
                    _check_token_id(token_id, limits.vocab_size, "prompt")
            elif item == "":
                raise invalid("`prompt` must not contain an empty string.", "prompt")
    if req.logprobs is not None and not 0 <= req.logprobs <= limits.max_logprobs:
        raise invalid(f"`logprobs` must be in [0, {limits.max_logprobs}].", "logprobs")
    if req.suffix:
        raise invalid("`suffix` is not supported.", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid("`best_of` different from `n` is not supported.", "best_of")
    if req.echo and req.logprobs is not None:
        raise invalid("`echo` together with `logprobs` (prompt logprobs) is not supported.", "echo")


def resolve_max_tokens(
    prompt_len: int,
    requested: int | None,
    param: str,
    max_model_len: int,
    default_max_tokens: int | None,
    min_tokens: int,
) -> int:
    """The generation budget for one prompt, or a 400 when the context cannot hold it."""
    if prompt_len >= max_model_len:
        raise RouterError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens, which leaves no room for output. Please reduce the length of the input.",
            param="input_tokens",
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if requested is not None and requested > room:
        raise RouterError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the input, {requested} for the completion). "
            "Please reduce the length of the input or of the completion.",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = requested if requested is not None else min(room, default_max_tokens or room)
    if min_tokens > max_tokens:
        raise invalid(
            f"`min_tokens` ({min_tokens}) must not exceed the max tokens ({max_tokens}).", "min_tokens"
        )
    return max_tokens
