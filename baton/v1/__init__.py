"""Generated protobuf / gRPC stubs of package ``baton.v1`` (see tools/gen_proto.py)."""
