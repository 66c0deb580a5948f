"""The environment contract of every Baton process: one frozen ``Settings`` read from ``BATON_*``.

Each variable is declared exactly once, as a field below; its name is ``BATON_`` + the field name in
upper case (``http_port`` -> ``BATON_HTTP_PORT``). ``ENV_VARS`` is derived from the fields, so the Helm
chart, the compose file and the docs are checked against the names the code really reads.

Precedence, highest first: CLI flag -> environment variable -> field default. The CLI builds
``Settings.from_env()`` and applies its flags with ``settings.override(...)``; both paths run the same
validation in ``__post_init__``, so a bad value fails the same way whichever way it came in.

An empty variable means "unset" (the default applies), so a template can render ``""`` for "default".
Secrets (``BATON_SECRET``, ``BATON_REDIS_PASSWORD``) never appear in ``repr`` or in error messages;
prefer their ``*_FILE`` variants (a mounted Secret) over putting them in the environment.

This module is stdlib-only: the router (which must not import torch or ray) reads it too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

ENV_PREFIX = "BATON_"

ROLES = ("serve", "router", "prefill", "decode", "ray-head", "ray-worker")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
KV_TRANSPORTS = ("auto", "nccl", "gloo")
ROUTING_POLICIES = ("cache-aware", "least-loaded", "round-robin")
FIRST_TOKEN_SOURCES = ("prefill", "decode")
SPECULATIVE_MODES = ("off", "ngram", "draft")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_AUTO = frozenset({"auto", "none"})


# --- parsers: raw environment string -> typed value (raise ValueError with the reason) ---------


def _parse_str(raw: str) -> str:
    return raw


def _parse_lower(raw: str) -> str:
    return raw.lower()


def _parse_int(raw: str) -> int:
    try:
        return int(raw, 10)
    except ValueError:
        raise ValueError("expected an integer") from None


def _parse_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("expected a number") from None


def _parse_bool(raw: str) -> bool:
    word = raw.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("expected one of on/off, true/false, yes/no, 1/0")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``auto`` / ``none`` mean "let the component decide" (``None``)."""

    def parse_optional(raw: str) -> Any:
        return None if raw.lower() in _AUTO else parse(raw)

    parse_optional.required = parse  # type: ignore[attr-defined]
    return parse_optional


# The Python type each parser produces; __post_init__ holds values set by the CLI to the same types.
_PARSED_TYPES: dict[Callable[[str], Any], tuple[type, ...]] = {
    _parse_str: (str,),
    _parse_lower: (str,),
    _parse_int: (int,),
    _parse_float: (int, float),
    _parse_bool: (bool,),
}


def _type_problem(parse: Callable[[str], Any], value: Any) -> str | None:
    required = getattr(parse, "required", None)
    if required is not None:
        if value is None:
            return None
        parse = required
    expected = _PARSED_TYPES[parse]
    if isinstance(value, bool) and bool not in expected:
        return f"expected {expected[0].__name__}, got bool"
    if not isinstance(value, expected):
        return f"expected {expected[0].__name__}, got {type(value).__name__}"
    return None


# --- checks: typed value -> error text, or None when valid --------------------------------------


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _port(value: int | None) -> str | None:
    if value is None or (isinstance(value, int) and 0 <= value <= 65535):
        return None
    return "must be a port number in 0..65535 (0: any free port)"


def _at_least(minimum: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value is None or value >= minimum else f"must be >= {minimum}"

    return check


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _fraction(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be in (0, 1]"


def _redis_url(value: str) -> str | None:
    if not value or value.startswith(REDIS_URL_SCHEMES):
        return None
    return f"must start with {', '.join(REDIS_URL_SCHEMES)} (or be empty for the embedded store)"


def _setting(
    default: Any,
    parse: Callable[[str], Any],
    doc: str,
    *,
    check: Callable[[Any], str | None] | None = None,
    aliases: tuple[str, ...] = (),
    secret: bool = False,
) -> Any:
    """Declare one setting: its default, how to parse its variable, how to validate the value."""
    meta = {"parse": parse, "check": check, "aliases": aliases, "secret": secret, "doc": doc}
    return field(default=default, repr=not secret, metadata=MappingProxyType(meta))


@dataclass(frozen=True)
class Settings:
    """Everything a Baton process reads from its environment (see the module docstring)."""

    # What to serve.
    model: str = _setting(
        "SmolLM2-135M-Instruct",
        _parse_str,
        "Model to serve: an HF repo id, a local directory or a GGUF file "
        "(with BATON_LOAD_FORMAT=dummy: the config whose shape gets random weights).",
        check=_non_empty,
    )
    dtype: str = _setting("auto", _parse_lower, "Weight and activation dtype.", check=_one_of(*DTYPES))
    load_format: str = _setting(
        "auto",
        _parse_lower,
        "How weights are read; dummy = random weights of the model's shape (smoke tests).",
        check=_one_of(*LOAD_FORMATS),
    )
    max_model_len: int | None = _setting(
        None,
        _optional(_parse_int),
        "Longest prompt + output in tokens (auto: the model's).",
        check=_at_least(1),
    )
    cache_dir: str = _setting("", _parse_str, "Directory for downloaded weights (empty: the user cache).")
    tokenizer: str = _setting(
        "", _parse_str, "Tokenizer folder for models without one, e.g. dummy weights (empty: the default model's)."
    )

    # Which process this is and where it listens.
    role: str = _setting("serve", _parse_lower, "Which process this container runs.", check=_one_of(*ROLES))
    host: str = _setting(
        "127.0.0.1",
        _parse_str,
        "Address Baton's listeners bind to and advertise (a pod sets its own IP).",
        check=_non_empty,
    )
    http_port: int = _setting(8000, _parse_int, "Router HTTP (OpenAI API, /health, /metrics).", check=_port)
    grpc_port: int = _setting(50051, _parse_int, "Router public gRPC API.", check=_port)
    worker_grpc_port: int = _setting(50061, _parse_int, "Prefill/decode worker gRPC (control).", check=_port)
    kv_port: int = _setting(50071, _parse_int, "Worker KV-transfer handshake listener.", check=_port)
    metrics_port: int | None = _setting(
        None,
        _optional(_parse_int),
        "Separate Prometheus /metrics port for workers (auto: none; the router serves /metrics on HTTP).",
        check=_port,
    )
    log_level: str = _setting("info", _parse_lower, "Log level.", check=_one_of(*LOG_LEVELS))
    otlp_endpoint: str = _setting("", _parse_str, "OTLP endpoint for traces (empty: tracing off).")
    kv_trace: bool = _setting(
        False, _parse_bool, "Print one timing line per KV piece from the workers (transfer diagnostics)."
    )
    step_trace: str = _setting(
        "",
        _parse_str,
        "A folder: every worker writes one timing line per engine step to <folder>/<worker>.steps.tsv (empty: off).",
    )

    # Cluster shape and the services the processes share.
    num_prefill: int = _setting(1, _parse_int, "Prefill workers the launcher keeps.", check=_at_least(0))
    num_decode: int = _setting(1, _parse_int, "Decode workers the launcher keeps.", check=_at_least(1))
    gpus_per_worker: float | None = _setting(
        None,
        _optional(_parse_float),
        "GPUs per worker actor (auto: 1 when CUDA is visible, else 0).",
        check=_at_least(0),
    )
    ray_address: str = _setting(
        "",
        _parse_str,
        "Ray cluster to join (empty: start a local one; also read from RAY_ADDRESS).",
        aliases=("RAY_ADDRESS",),
    )
    ray_role_resources: bool = _setting(
        False,
        _parse_bool,
        "Place prefill/decode actors on Ray nodes advertising the custom resource baton_prefill/baton_decode.",
    )
    dashboard: bool = _setting(False, _parse_bool, "Start the Ray dashboard.")
    redis_url: str = _setting(
        "",
        _parse_str,
        "Placement store, without credentials (empty: the embedded store, single host only).",
        check=_redis_url,
    )
    redis_password: str = _setting("", _parse_str, "Placement store password.", secret=True)
    redis_password_file: str = _setting("", _parse_str, "File holding the placement store password.")
    secret: str = _setting(
        "", _parse_str, "Shared secret that components use to authenticate each other.", secret=True
    )
    secret_file: str = _setting("", _parse_str, "File holding the shared secret.")

    # Engine and KV transfer.
    block_size: int = _setting(16, _parse_int, "Tokens per KV cache block.", check=_at_least(1))
    max_num_seqs: int | None = _setting(
        None, _optional(_parse_int), "Most sequences in one batch (auto: engine default).", check=_at_least(1)
    )
    max_num_batched_tokens: int | None = _setting(
        None, _optional(_parse_int), "Token budget of one step (auto: engine default).", check=_at_least(1)
    )
    gpu_memory_utilization: float = _setting(
        0.9, _parse_float, "Fraction of GPU memory the worker may use.", check=_fraction
    )
    kv_transport: str = _setting(
        "auto",
        _parse_lower,
        "KV transfer transport (auto: nccl on GPU, gloo on CPU).",
        check=_one_of(*KV_TRANSPORTS),
    )
    speculative: str = _setting(
        "off", _parse_lower, "Speculative decoding on decode workers.", check=_one_of(*SPECULATIVE_MODES)
    )

    # Routing.
    routing_policy: str = _setting(
        "cache-aware",
        _parse_lower,
        "How the router pairs requests with workers.",
        check=_one_of(*ROUTING_POLICIES),
    )
    local_prefill_threshold: int | None = _setting(
        None,
        _optional(_parse_int),
        "Uncached prompt tokens below which decode prefills locally (auto: router default).",
        check=_at_least(0),
    )
    first_token_from: str = _setting(
        "prefill",
        _parse_lower,
        "Who streams a split request's first token: prefill (the moment the prefill worker samples it)"
        " or decode (when the decode worker starts the stream: a step later, then evenly spaced).",
        check=_one_of(*FIRST_TOKEN_SOURCES),
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata["check"]
            value = getattr(self, f.name)
            problem = _type_problem(f.metadata["parse"], value)
            if problem is None and check is not None:
                problem = check(value)
            if problem is not None:
                raise ValueError(f"{env_name(f.name)} ({f.name}) = {_shown(f, value)}: {problem}")
        if self.secret and self.secret_file:
            raise ValueError("set BATON_SECRET or BATON_SECRET_FILE, not both")
        if self.redis_password and self.redis_password_file:
            raise ValueError("set BATON_REDIS_PASSWORD or BATON_REDIS_PASSWORD_FILE, not both")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default: ``os.environ``); unset or empty -> default.

        Raises ``ValueError`` naming the variable when a value does not parse or validate.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            for name in (env_name(f.name), *f.metadata["aliases"]):
                raw = env.get(name, "").strip()
                if raw:
                    break
            else:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise ValueError(f"{name}={_shown(f, raw)}: {exc}") from None
        return cls(**values)

    def override(self, **changes: Any) -> Settings:
        """A copy with CLI flags applied; a ``None`` change means "flag not given" and is skipped."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """Every primary ``BATON_*`` variable, so that ``from_env(to_env(s)) == s`` in any environment.

        Used to hand settings to child processes; it includes secrets, so never log it.
        """
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                text = "auto"
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            out[env_name(f.name)] = text
        return out

    def resolved_secret(self) -> str:
        """The shared secret, read from ``secret_file`` when that is how it was given ("" if neither)."""
        return _read_secret(self.secret, self.secret_file, "BATON_SECRET_FILE")

    def resolved_redis_password(self) -> str:
        """The placement store password ("" if none), read from its file when given that way."""
        return _read_secret(self.redis_password, self.redis_password_file, "BATON_REDIS_PASSWORD_FILE")


def env_name(field_name: str) -> str:
    """The primary variable of a ``Settings`` field: ``http_port`` -> ``BATON_HTTP_PORT``."""
    return ENV_PREFIX + field_name.upper()


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """``BATON_*`` variables in ``environ`` that no setting reads (likely typos; the CLI warns)."""
    env = os.environ if environ is None else environ
    return sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in ENV_VARS)


def _shown(f: Any, value: Any) -> str:
    return "<redacted>" if f.metadata["secret"] else repr(value)


def _read_secret(value: str, path: str, variable: str) -> str:
    if value or not path:
        return value
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
    except OSError as exc:
        raise ValueError(f"{variable}={path!r}: cannot read: {exc.strerror}") from None
    if not text:
        raise ValueError(f"{variable}={path!r}: the file is empty")
    return text


# Every variable a Baton process reads: primary names plus aliases, derived from the fields above.
ENV_VARS: frozenset[str] = frozenset(
    name for f in fields(Settings) for name in (env_name(f.name), *f.metadata["aliases"])
)

# One line of documentation per primary variable, in declaration order (for docs and `--help`).
ENV_DOCS: Mapping[str, str] = MappingProxyType(
    {env_name(f.name): f.metadata["doc"] for f in fields(Settings)}
)
