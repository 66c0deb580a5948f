"""``baton bench``: serving benchmark for any OpenAI-compatible endpoint.

Map: ``datasets`` (what to send) -> ``arrivals`` (when) -> ``client`` (send one, time it) ->
``metrics`` (summarise, vLLM field names) -> ``report`` / ``plots`` (tables, JSON, PNG);
``runner`` wires one invocation, ``cli`` parses flags, ``peer_check`` compares with another tool.
"""
