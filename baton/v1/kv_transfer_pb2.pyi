from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

from baton.v1 import common_pb2 as _common_pb2

DESCRIPTOR: _descriptor.FileDescriptor

class ChecksumAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKSUM_ALGORITHM_NONE: _ClassVar[ChecksumAlgorithm]
    CHECKSUM_ALGORITHM_CRC32: _ClassVar[ChecksumAlgorithm]
    CHECKSUM_ALGORITHM_SHA256: _ClassVar[ChecksumAlgorithm]
CHECKSUM_ALGORITHM_NONE: ChecksumAlgorithm
CHECKSUM_ALGORITHM_CRC32: ChecksumAlgorithm
CHECKSUM_ALGORITHM_SHA256: ChecksumAlgorithm

class Hello(_message.Message):
    __slots__ = ("protocol_version", "sender_id", "client_nonce")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    sender_id: str
    client_nonce: bytes
    def __init__(self, protocol_version: int | None = ..., sender_id: str | None = ..., client_nonce: bytes | None = ...) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("protocol_version", "receiver_id", "server_nonce", "server_mac")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_MAC_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    receiver_id: str
    server_nonce: bytes
    server_mac: bytes
    def __init__(self, protocol_version: int | None = ..., receiver_id: str | None = ..., server_nonce: bytes | None = ..., server_mac: bytes | None = ...) -> None: ...

class AuthResponse(_message.Message):
    __slots__ = ("client_mac",)
    CLIENT_MAC_FIELD_NUMBER: _ClassVar[int]
    client_mac: bytes
    def __init__(self, client_mac: bytes | None = ...) -> None: ...

class AuthResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: _common_pb2.Error
    def __init__(self, ok: bool | None = ..., error: _common_pb2.Error | _Mapping | None = ...) -> None: ...

class PairSetupRequest(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: str
    def __init__(self, backend: str | None = ...) -> None: ...

class PairSetupResponse(_message.Message):
    __slots__ = ("store_address", "group_prefix", "sender_rank", "receiver_rank", "timeout_ms")
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GROUP_PREFIX_FIELD_NUMBER: _ClassVar[int]
    SENDER_RANK_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_RANK_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    store_address: str
    group_prefix: str
    sender_rank: int
    receiver_rank: int
    timeout_ms: int
    def __init__(self, store_address: str | None = ..., group_prefix: str | None = ..., sender_rank: int | None = ..., receiver_rank: int | None = ..., timeout_ms: int | None = ...) -> None: ...

class TransferHeader(_message.Message):
    __slots__ = ("request_id", "handle_id", "dst_block_offset", "block_ids", "num_layers", "dtype", "shape", "payload_bytes", "message_bytes", "num_messages", "checksum_algorithm", "checksum", "piece_index")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_ID_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PIECE_INDEX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handle_id: str
    dst_block_offset: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_layers: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload_bytes: int
    message_bytes: int
    num_messages: int
    checksum_algorithm: ChecksumAlgorithm
    checksum: bytes
    piece_index: int
    def __init__(self, request_id: str | None = ..., handle_id: str | None = ..., dst_block_offset: int | None = ..., block_ids: _Iterable[int] | None = ..., num_layers: int | None = ..., dtype: str | None = ..., shape: _Iterable[int] | None = ..., payload_bytes: int | None = ..., message_bytes: int | None = ..., num_messages: int | None = ..., checksum_algorithm: ChecksumAlgorithm | str | None = ..., checksum: bytes | None = ..., piece_index: int | None = ...) -> None: ...

class TransferDone(_message.Message):
    __slots__ = ("request_id", "handle_id", "num_pieces")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PIECES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handle_id: str
    num_pieces: int
    def __init__(self, request_id: str | None = ..., handle_id: str | None = ..., num_pieces: int | None = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("handle_id", "piece_index")
    HANDLE_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_INDEX_FIELD_NUMBER: _ClassVar[int]
    handle_id: str
    piece_index: int
    def __init__(self, handle_id: str | None = ..., piece_index: int | None = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("handle_id", "piece_index", "error")
    HANDLE_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    handle_id: str
    piece_index: int
    error: _common_pb2.Error
    def __init__(self, handle_id: str | None = ..., piece_index: int | None = ..., error: _common_pb2.Error | _Mapping | None = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: str | None = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("hello", "challenge", "auth_response", "auth_result", "pair_setup_request", "pair_setup_response", "transfer_header", "transfer_done", "ack", "nack", "goodbye")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    AUTH_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    AUTH_RESULT_FIELD_NUMBER: _ClassVar[int]
    PAIR_SETUP_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PAIR_SETUP_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_HEADER_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_DONE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    challenge: Challenge
    auth_response: AuthResponse
    auth_result: AuthResult
    pair_setup_request: PairSetupRequest
    pair_setup_response: PairSetupResponse
    transfer_header: TransferHeader
    transfer_done: TransferDone
    ack: Ack
    nack: Nack
    goodbye: Goodbye
    def __init__(self, hello: Hello | _Mapping | None = ..., challenge: Challenge | _Mapping | None = ..., auth_response: AuthResponse | _Mapping | None = ..., auth_result: AuthResult | _Mapping | None = ..., pair_setup_request: PairSetupRequest | _Mapping | None = ..., pair_setup_response: PairSetupResponse | _Mapping | None = ..., transfer_header: TransferHeader | _Mapping | None = ..., transfer_done: TransferDone | _Mapping | None = ..., ack: Ack | _Mapping | None = ..., nack: Nack | _Mapping | None = ..., goodbye: Goodbye | _Mapping | None = ...) -> None: ...
