"""The ``baton`` command: one entry point, subcommands registered from their own modules.

    baton generate "prompt"     one completion on the local engine (default model)
    baton chat                  interactive chat in the terminal
    baton serve                 the whole cluster on this machine (Ray + workers + router)
    baton bench                 load-test any OpenAI-compatible endpoint
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int]


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model: default SmolLM2-135M-Instruct; an HF folder, a .gguf file or dummy:<shape>")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)


def _sampling(args: argparse.Namespace):
    from engine.sampling.params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _llm(args: argparse.Namespace):
    from engine.llm import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device)


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    sampling = _sampling(args)
    if args.raw or llm.tokenizer is None or llm.tokenizer.chat_template is None:
        ids = llm.encode(args.prompt)
    else:
        ids = llm.render_chat([{"role": "user", "content": args.prompt}])
    for delta in llm.stream(ids, sampling):
        print(delta, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _llm(args)
    sampling = _sampling(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("baton chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            return 0
        history.append({"role": "user", "content": line})
        reply = ""
        for delta in llm.stream(llm.render_chat(history), sampling):
            reply += delta
            print(delta, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate one completion on the local engine")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    _add_engine_args(p)
    p.set_defaults(func=cmd_chat)

    for register in _optional_commands():
        register(sub)
    return parser


def _optional_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands living in their own packages (cluster launcher, benchmark)."""
    out = []
    try:
        from baton.bench.cli import add_parser as add_bench
    except ImportError:
        add_bench = None
    if add_bench is not None:
        out.append(add_bench)
    try:
        from baton.launcher.cli import register as add_launcher
    except ImportError:
        add_launcher = None
    if add_launcher is not None:
        out.append(add_launcher)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # bad flags or model spec: one clear line, no traceback
        print(f"baton: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
