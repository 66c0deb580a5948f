"""Baton's router: the gateway in front of the prefill/decode workers. GPU-free (no torch, ray, engine
or worker imports), so it runs in a small CPU pod.

Map:
- ``app`` / ``openai_handlers`` / ``openai_format`` / ``http_util``: the OpenAI-compatible HTTP API;
- ``grpc_server``: the public gRPC API (``baton.v1.RouterService``) + health + reflection;
- ``validation`` / ``errors`` / ``protocol``: request checks before any work, OpenAI error shape;
- ``prompts`` / ``generation`` / ``stops``: tokenize, fan out n choices, detokenize, stop strings;
- ``backend``: the ``GenerationBackend`` seam; ``cluster_backend``: it, over the workers' gRPC;
- ``policy`` / ``hashing`` / ``placement``: cache-aware pairing on the shared placement store;
- ``registrar``: worker info and KV events into the store; ``server``: ``python -m router``.

Request lifecycle: validate -> template + tokenize -> per choice: hash blocks, place (policy + store),
Reserve on D, Prefill on P (or local), Decode stream -> detokenize, stop strings -> SSE / gRPC.
"""
