from baton.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

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
    def __init__(self, protocol_version: _Optional[int] = ..., sender_id: _Optional[str] = ..., client_nonce: _Optional[bytes] = ...) -> None: ...

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
    def __init__(self, protocol_version: _Optional[int] = ..., receiver_id: _Optional[str] = ..., server_nonce: _Optional[bytes] = ..., server_mac: _Optional[bytes] = ...) -> None: ...

class AuthResponse(_message.Message):
    __slots__ = ("client_mac",)
    CLIENT_MAC_FIELD_NUMBER: _ClassVar[int]
    client_mac: bytes
    def __init__(self, client_mac: _Optional[bytes] = ...) -> None: ...

class AuthResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: _common_pb2.Error
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class PairSetupRequest(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: str
    def __init__(self, backend: _Optional[str] = ...) -> None: ...

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
    def __init__(self, store_address: _Optional[str] = ..., group_prefix: _Optional[str] = ..., sender_rank: _Optional[int] = ..., receiver_rank: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class TransferHeader(_message.Message):
    __slots__ = ("request_id", "handle_id", "dst_block_offset", "block_ids", "num_layers", "dtype", "shape", "payload_bytes", "message_bytes", "num_messages", "checksum_algorithm", "checksum", "piece_index", "last")
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
    LAST_FIELD_NUMBER: _ClassVar[int]
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
    last: bool
    def __init__(self, request_id: _Optional[str] = ..., handle_id: _Optional[str] = ..., dst_block_offset: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_layers: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., payload_bytes: _Optional[int] = ..., message_bytes: _Optional[int] = ..., num_messages: _Optional[int] = ..., checksum_algorithm: _Optional[_Union[ChecksumAlgorithm, str]] = ..., checksum: _Optional[bytes] = ..., piece_index: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...

class TransferDone(_message.Message):
    __slots__ = ("request_id", "handle_id", "num_pieces")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PIECES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handle_id: str
    num_pieces: int
    def __init__(self, request_id: _Optional[str] = ..., handle_id: _Optional[str] = ..., num_pieces: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("handle_id", "piece_index")
    HANDLE_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_INDEX_FIELD_NUMBER: _ClassVar[int]
    handle_id: str
    piece_index: int
    def __init__(self, handle_id: _Optional[str] = ..., piece_index: _Optional[int] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("handle_id", "piece_index", "error")
    HANDLE_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    handle_id: str
    piece_index: int
    error: _common_pb2.Error
    def __init__(self, handle_id: _Optional[str] = ..., piece_index: _Optional[int] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

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
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., challenge: _Optional[_Union[Challenge, _Mapping]] = ..., auth_response: _Optional[_Union[AuthResponse, _Mapping]] = ..., auth_result: _Optional[_Union[AuthResult, _Mapping]] = ..., pair_setup_request: _Optional[_Union[PairSetupRequest, _Mapping]] = ..., pair_setup_response: _Optional[_Union[PairSetupResponse, _Mapping]] = ..., transfer_header: _Optional[_Union[TransferHeader, _Mapping]] = ..., transfer_done: _Optional[_Union[TransferDone, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., nack: _Optional[_Union[Nack, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ...) -> None: ...
