"""The realtime wire contract (docs/PROTOCOL.md): typed messages both ways, validation, close codes.

Imports neither torch nor ray, so clients, tests and the ingress use it cheaply.
"""

from .actions import ACTIONS, ActionTable, Motion
from .client_messages import (
    MAX_PENDING_ENTRIES,
    CameraState,
    ClientEvent,
    ConditionInputs,
    InitLimits,
    InitRequest,
    SessionDefaults,
    StateTransition,
    decode_event,
    decode_init,
    normalize_prompt,
    parse_size,
)
from .errors import (
    GENERATION_COMPLETE,
    INVALID_EVENT,
    INVALID_INIT,
    AuthError,
    CapacityError,
    CloseCode,
    InitTimeout,
    InvalidEvent,
    InvalidInit,
    MessageTooBig,
    Outcome,
    ProtocolError,
    ServerShutdown,
    SessionLost,
    outcome_for,
)
from .models_card import ModelCard, ModelList, ModelNotFound, model_not_found
from .server_messages import (
    MAX_WIRE_ARRAY,
    ChunkStats,
    ErrorMessage,
    FrameBatch,
    ServerMessage,
    encode_server_message,
)

__all__ = [name for name in dir() if not name.startswith("_")]
