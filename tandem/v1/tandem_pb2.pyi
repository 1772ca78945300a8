from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Budget(_message.Message):
    __slots__ = ("ttft_ms", "tpot_ms", "energy_j", "best_effort", "quality_floor", "experts")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    BEST_EFFORT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: float
    tpot_ms: float
    energy_j: float
    best_effort: bool
    quality_floor: float
    experts: int
    def __init__(self, ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ..., energy_j: _Optional[float] = ..., best_effort: _Optional[bool] = ..., quality_floor: _Optional[float] = ..., experts: _Optional[int] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "n", "logprobs", "prompt_logprobs", "constraint", "skip_ratio", "lossless", "kv_prediction", "kv_repair")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    SKIP_RATIO_FIELD_NUMBER: _ClassVar[int]
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    KV_PREDICTION_FIELD_NUMBER: _ClassVar[int]
    KV_REPAIR_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    n: int
    logprobs: int
    prompt_logprobs: int
    constraint: str
    skip_ratio: float
    lossless: bool
    kv_prediction: float
    kv_repair: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., n: _Optional[int] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., constraint: _Optional[str] = ..., skip_ratio: _Optional[float] = ..., lossless: _Optional[bool] = ..., kv_prediction: _Optional[float] = ..., kv_repair: _Optional[bool] = ...) -> None: ...

class KVVariant(_message.Message):
    __slots__ = ("depth", "aux_layers", "agreement", "bpb_ratio", "prefill_share")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    AUX_LAYERS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    BPB_RATIO_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SHARE_FIELD_NUMBER: _ClassVar[int]
    depth: float
    aux_layers: _containers.RepeatedScalarFieldContainer[int]
    agreement: float
    bpb_ratio: float
    prefill_share: float
    def __init__(self, depth: _Optional[float] = ..., aux_layers: _Optional[_Iterable[int]] = ..., agreement: _Optional[float] = ..., bpb_ratio: _Optional[float] = ..., prefill_share: _Optional[float] = ...) -> None: ...

class SkipVariant(_message.Message):
    __slots__ = ("ratio", "layers", "agreement")
    RATIO_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    layers: int
    agreement: float
    def __init__(self, ratio: _Optional[float] = ..., layers: _Optional[int] = ..., agreement: _Optional[float] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top", "none")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    none: bool
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ..., none: _Optional[bool] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages", "tools_json")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_JSON_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    tools_json: str
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., tools_json: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("prompt", "chat", "tokens")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: ChatMessages
    tokens: TokenIds
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "arch", "n_layers", "quant", "weight_bytes", "layers", "config_json", "chat", "calibration_json", "engine", "chat_template_tokens", "tools", "version", "skip_ratios", "kv_variants", "skip_variants")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_JSON_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SKIP_RATIOS_FIELD_NUMBER: _ClassVar[int]
    KV_VARIANTS_FIELD_NUMBER: _ClassVar[int]
    SKIP_VARIANTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    arch: str
    n_layers: int
    quant: str
    weight_bytes: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    config_json: str
    chat: bool
    calibration_json: str
    engine: str
    chat_template_tokens: int
    tools: bool
    version: str
    skip_ratios: _containers.RepeatedScalarFieldContainer[float]
    kv_variants: _containers.RepeatedCompositeFieldContainer[KVVariant]
    skip_variants: _containers.RepeatedCompositeFieldContainer[SkipVariant]
    def __init__(self, name: _Optional[str] = ..., arch: _Optional[str] = ..., n_layers: _Optional[int] = ..., quant: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., config_json: _Optional[str] = ..., chat: _Optional[bool] = ..., calibration_json: _Optional[str] = ..., engine: _Optional[str] = ..., chat_template_tokens: _Optional[int] = ..., tools: _Optional[bool] = ..., version: _Optional[str] = ..., skip_ratios: _Optional[_Iterable[float]] = ..., kv_variants: _Optional[_Iterable[_Union[KVVariant, _Mapping]]] = ..., skip_variants: _Optional[_Iterable[_Union[SkipVariant, _Mapping]]] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("kind", "device_id", "profile", "model", "layer_start", "layer_end", "emulated", "predicted_ttft_ms", "predicted_tpot_ms", "predicted_energy_j", "admitted_ttft_ms", "admitted_tpot_ms", "quantile", "calibrated", "kv_prediction", "skip_ratio", "experts")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    EMULATED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    KV_PREDICTION_FIELD_NUMBER: _ClassVar[int]
    SKIP_RATIO_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    device_id: str
    profile: str
    model: str
    layer_start: int
    layer_end: int
    emulated: bool
    predicted_ttft_ms: float
    predicted_tpot_ms: float
    predicted_energy_j: float
    admitted_ttft_ms: float
    admitted_tpot_ms: float
    quantile: float
    calibrated: bool
    kv_prediction: float
    skip_ratio: float
    experts: _containers.RepeatedCompositeFieldContainer[ExpertWeight]
    def __init__(self, kind: _Optional[str] = ..., device_id: _Optional[str] = ..., profile: _Optional[str] = ..., model: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., emulated: _Optional[bool] = ..., predicted_ttft_ms: _Optional[float] = ..., predicted_tpot_ms: _Optional[float] = ..., predicted_energy_j: _Optional[float] = ..., admitted_ttft_ms: _Optional[float] = ..., admitted_tpot_ms: _Optional[float] = ..., quantile: _Optional[float] = ..., calibrated: _Optional[bool] = ..., kv_prediction: _Optional[float] = ..., skip_ratio: _Optional[float] = ..., experts: _Optional[_Iterable[_Union[ExpertWeight, _Mapping]]] = ...) -> None: ...

class ExpertWeight(_message.Message):
    __slots__ = ("expert", "weight")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    expert: str
    weight: float
    def __init__(self, expert: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "ttft_ms", "tpot_ms", "energy_j", "engine_ttft_ms", "engine_tpot_ms", "hub_route_ms", "hub_relay_ms", "prefill_ms", "decode_ms", "queue_ms", "energy_measured", "skipped_layers", "lossless", "drafted", "accepted", "kv_depth", "kv_predicted", "kv_repaired_at")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENGINE_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    HUB_ROUTE_MS_FIELD_NUMBER: _ClassVar[int]
    HUB_RELAY_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MEASURED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    KV_DEPTH_FIELD_NUMBER: _ClassVar[int]
    KV_PREDICTED_FIELD_NUMBER: _ClassVar[int]
    KV_REPAIRED_AT_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    tpot_ms: float
    energy_j: float
    engine_ttft_ms: float
    engine_tpot_ms: float
    hub_route_ms: float
    hub_relay_ms: float
    prefill_ms: float
    decode_ms: float
    queue_ms: float
    energy_measured: bool
    skipped_layers: _containers.RepeatedScalarFieldContainer[int]
    lossless: bool
    drafted: int
    accepted: int
    kv_depth: float
    kv_predicted: int
    kv_repaired_at: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ..., energy_j: _Optional[float] = ..., engine_ttft_ms: _Optional[float] = ..., engine_tpot_ms: _Optional[float] = ..., hub_route_ms: _Optional[float] = ..., hub_relay_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., energy_measured: _Optional[bool] = ..., skipped_layers: _Optional[_Iterable[int]] = ..., lossless: _Optional[bool] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., kv_depth: _Optional[float] = ..., kv_predicted: _Optional[int] = ..., kv_repaired_at: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "input", "sampling", "budget", "request_id", "device")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    model: str
    input: Input
    sampling: Sampling
    budget: Budget
    request_id: str
    device: str
    def __init__(self, model: _Optional[str] = ..., input: _Optional[_Union[Input, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., request_id: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "placements", "metrics", "request_id", "index", "logprobs", "prompt_logprobs", "choice_finish_reason", "prompt_token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    placements: _containers.RepeatedCompositeFieldContainer[Placement]
    metrics: Metrics
    request_id: str
    index: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    choice_finish_reason: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., placements: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ..., request_id: _Optional[str] = ..., index: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., choice_finish_reason: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class MqttInfo(_message.Message):
    __slots__ = ("host", "port", "username", "password", "topic_prefix", "tls_port")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    TOPIC_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TLS_PORT_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    username: str
    password: str
    topic_prefix: str
    tls_port: int
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., topic_prefix: _Optional[str] = ..., tls_port: _Optional[int] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "name", "profile", "models", "emulated", "csr")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EMULATED_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    token: str
    name: str
    profile: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    emulated: bool
    csr: bytes
    def __init__(self, token: _Optional[str] = ..., name: _Optional[str] = ..., profile: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., emulated: _Optional[bool] = ..., csr: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "credential", "mqtt", "certificate", "ca_certificate", "device_port")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    MQTT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PORT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    credential: str
    mqtt: MqttInfo
    certificate: bytes
    ca_certificate: bytes
    device_port: int
    def __init__(self, device_id: _Optional[str] = ..., credential: _Optional[str] = ..., mqtt: _Optional[_Union[MqttInfo, _Mapping]] = ..., certificate: _Optional[bytes] = ..., ca_certificate: _Optional[bytes] = ..., device_port: _Optional[int] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("ttl_s",)
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    ttl_s: float
    def __init__(self, ttl_s: _Optional[float] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "expires_unix")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_unix: float
    def __init__(self, token: _Optional[str] = ..., expires_unix: _Optional[float] = ...) -> None: ...

class UpdateDeviceRequest(_message.Message):
    __slots__ = ("device_id", "model", "quant")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    model: str
    quant: str
    def __init__(self, device_id: _Optional[str] = ..., model: _Optional[str] = ..., quant: _Optional[str] = ...) -> None: ...

class UpdateDeviceResponse(_message.Message):
    __slots__ = ("command_id",)
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    def __init__(self, command_id: _Optional[str] = ...) -> None: ...

class FetchBundleRequest(_message.Message):
    __slots__ = ("command_id",)
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    def __init__(self, command_id: _Optional[str] = ...) -> None: ...

class BundleChunk(_message.Message):
    __slots__ = ("path", "offset", "data", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Device(_message.Message):
    __slots__ = ("device_id", "name", "profile", "status", "models", "last_seen_unix", "load", "queue_depth", "emulated", "connected", "agent_version", "update")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    EMULATED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    name: str
    profile: str
    status: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    last_seen_unix: float
    load: float
    queue_depth: int
    emulated: bool
    connected: bool
    agent_version: str
    update: str
    def __init__(self, device_id: _Optional[str] = ..., name: _Optional[str] = ..., profile: _Optional[str] = ..., status: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., last_seen_unix: _Optional[float] = ..., load: _Optional[float] = ..., queue_depth: _Optional[int] = ..., emulated: _Optional[bool] = ..., connected: _Optional[bool] = ..., agent_version: _Optional[str] = ..., update: _Optional[str] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ...) -> None: ...

class Work(_message.Message):
    __slots__ = ("work_id", "model", "input", "continue_ids", "sampling", "layer_start", "layer_end", "hidden", "deadline_unix", "experts", "continue_chars", "hidden_dtype", "logits")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_CHARS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    model: str
    input: Input
    continue_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    layer_start: int
    layer_end: int
    hidden: HiddenStates
    deadline_unix: float
    experts: _containers.RepeatedScalarFieldContainer[str]
    continue_chars: int
    hidden_dtype: str
    logits: bool
    def __init__(self, work_id: _Optional[str] = ..., model: _Optional[str] = ..., input: _Optional[_Union[Input, _Mapping]] = ..., continue_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., hidden: _Optional[_Union[HiddenStates, _Mapping]] = ..., deadline_unix: _Optional[float] = ..., experts: _Optional[_Iterable[str]] = ..., continue_chars: _Optional[int] = ..., hidden_dtype: _Optional[str] = ..., logits: _Optional[bool] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("work_id",)
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    def __init__(self, work_id: _Optional[str] = ...) -> None: ...

class StageInput(_message.Message):
    __slots__ = ("work_id", "token_ids", "hidden", "end")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hidden: HiddenStates
    end: bool
    def __init__(self, work_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[HiddenStates, _Mapping]] = ..., end: _Optional[bool] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("mqtt", "device_port")
    MQTT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PORT_FIELD_NUMBER: _ClassVar[int]
    mqtt: MqttInfo
    device_port: int
    def __init__(self, mqtt: _Optional[_Union[MqttInfo, _Mapping]] = ..., device_port: _Optional[int] = ...) -> None: ...

class HubMessage(_message.Message):
    __slots__ = ("work", "cancel", "ping", "welcome", "stage")
    WORK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    work: Work
    cancel: Cancel
    ping: Ping
    welcome: Welcome
    stage: StageInput
    def __init__(self, work: _Optional[_Union[Work, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., stage: _Optional[_Union[StageInput, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("sent_unix",)
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    sent_unix: float
    def __init__(self, sent_unix: _Optional[float] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("models", "max_concurrency", "agent_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    max_concurrency: int
    agent_version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., max_concurrency: _Optional[int] = ..., agent_version: _Optional[str] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("work_id", "token_ids", "text", "index", "logprobs", "prompt_logprobs", "finish_reason", "prompt_token_ids")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    index: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finish_reason: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, work_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., index: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkDone(_message.Message):
    __slots__ = ("work_id", "finish_reason", "metrics")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    finish_reason: str
    metrics: Metrics
    def __init__(self, work_id: _Optional[str] = ..., finish_reason: _Optional[str] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...

class WorkError(_message.Message):
    __slots__ = ("work_id", "code", "message")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    code: str
    message: str
    def __init__(self, work_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class HiddenStates(_message.Message):
    __slots__ = ("work_id", "layer_end", "shape", "dtype", "data")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    layer_end: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, work_id: _Optional[str] = ..., layer_end: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class KVBlock(_message.Message):
    __slots__ = ("work_id", "layer", "start_pos", "shape", "dtype", "keys", "values")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    layer: int
    start_pos: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    keys: bytes
    values: bytes
    def __init__(self, work_id: _Optional[str] = ..., layer: _Optional[int] = ..., start_pos: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., keys: _Optional[bytes] = ..., values: _Optional[bytes] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("sent_unix",)
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    sent_unix: float
    def __init__(self, sent_unix: _Optional[float] = ...) -> None: ...

class UpdateResult(_message.Message):
    __slots__ = ("command_id", "ok", "message", "model", "version")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    ok: bool
    message: str
    model: str
    version: str
    def __init__(self, command_id: _Optional[str] = ..., ok: _Optional[bool] = ..., message: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "tokens", "done", "error", "hidden", "kv", "pong", "update")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    tokens: TokenChunk
    done: WorkDone
    error: WorkError
    hidden: HiddenStates
    kv: KVBlock
    pong: Pong
    update: UpdateResult
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., tokens: _Optional[_Union[TokenChunk, _Mapping]] = ..., done: _Optional[_Union[WorkDone, _Mapping]] = ..., error: _Optional[_Union[WorkError, _Mapping]] = ..., hidden: _Optional[_Union[HiddenStates, _Mapping]] = ..., kv: _Optional[_Union[KVBlock, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., update: _Optional[_Union[UpdateResult, _Mapping]] = ...) -> None: ...
