"""The agent's wire messages: protobufs built from its own state, and settings read from the hub's.

Pure functions, no agent state and no I/O, so the agent (edge_agent.agent) and its work runner
(edge_agent.works) share them and tests can check them alone: the ModelInfo an agent advertises,
a generated token as its TokenChunk, a layer-skipping report in a request's Metrics, the writer's
merging of queued replies (coalesce), and the broker settings an EnrollResponse or a Welcome gives.
"""

from __future__ import annotations

from dataclasses import replace

from edge_agent.identity import DeviceIdentity, hub_host
from edge_agent.telemetry import MqttSettings
from models.generate import TokenEvent, plain
from models.serving import ServedModel
from models.skip import SkipReport
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import kv_variant_message, logprob_message, skip_variant_message


def coalesce(messages: list[pb.AgentMessage]) -> list[pb.AgentMessage]:
    """The same replies in fewer messages: each work's queued TokenChunks of one choice become one
    (ids, text and logprobs concatenated, at the place of the first; a choice's last chunk, which
    carries its finish reason, closes it), so a busy agent sends what it has ready
    together and the hub relays one message where it would relay several. Nothing waits for
    this: it merges only what is already queued. Order within a work is kept (its WorkDone or
    WorkError follows all of its tokens); across works it does not matter.
    """
    out: list[pb.AgentMessage] = []
    open_chunks: dict[str, pb.TokenChunk] = {}
    for msg in messages:
        kind = msg.WhichOneof("kind")
        if kind != "tokens":
            if kind in ("done", "error"):
                open_chunks.pop(getattr(msg, kind).work_id, None)
            out.append(msg)
            continue
        chunk = open_chunks.get(msg.tokens.work_id)
        if chunk is None or chunk.index != msg.tokens.index or chunk.finish_reason:  # another choice, or its end
            open_chunks[msg.tokens.work_id] = msg.tokens
            out.append(msg)
        else:
            chunk.token_ids.extend(msg.tokens.token_ids)
            chunk.text += msg.tokens.text
            chunk.logprobs.extend(msg.tokens.logprobs)
            chunk.finish_reason = msg.tokens.finish_reason
    return out


def mqtt_settings(info: pb.MqttInfo, hub: str, identity: DeviceIdentity | None) -> MqttSettings | None:
    """How telemetry reaches the broker the hub named (None: it has none). With a TLS listener and
    our certificate: over TLS, at the host we dial the hub at (edge_agent.identity.hub_host); its
    plaintext listener is then for the hub's own machine only."""
    if not info.host:
        return None
    plain = MqttSettings(info.host, info.port, info.username, info.password, info.topic_prefix)
    if not info.tls_port or identity is None:
        return plain
    files = {"ca_file": str(identity.ca_file), "cert_file": str(identity.cert_file), "key_file": str(identity.key_file)}
    return replace(plain, host=hub_host(hub), port=info.tls_port, **files)


def followed_broker(current: MqttSettings, info: pb.MqttInfo, hub: str) -> MqttSettings:
    """`current` moved to the broker address a Welcome gives: its TLS port when we speak TLS to it,
    else its host and port. The login and the TLS files stay our own."""
    if current.ca_file and info.tls_port:
        return replace(current, host=hub_host(hub), port=info.tls_port)
    return replace(current, host=info.host, port=info.port)


def model_info(served: ServedModel) -> pb.ModelInfo:
    """What this agent advertises about `served`: its ModelInfo fields, the skip ratios its
    layer-skipping routers were trained for (and each one's measured agreement, the hub's to weigh
    under a quality_floor) and its KV-prediction variants, so that the hub sends
    requests with a skip_ratio or a kv_prediction only where they can be served. None with a step
    engine (edge_agent.engines): both run on the model's own route only (models.generate refuses
    them elsewhere). Read at each Hello: an update may bring routers or predictors or take them away."""
    return pb.ModelInfo(
        **served.info,
        skip_ratios=served.skip_ratios,
        kv_variants=[kv_variant_message(**vars(v)) for v in served.kv_variants],
        skip_variants=[skip_variant_message(**vars(v)) for v in served.skip_variants],
    )


def skip_metrics(metrics: pb.Metrics, report: SkipReport) -> None:
    """Write a request's layer-skipping report (models.skip.SkipReport) into its Metrics."""
    metrics.skipped_layers.extend(report.layers)
    metrics.lossless = report.lossless
    metrics.drafted, metrics.accepted = report.drafted, report.accepted


def token_chunk(work_id: str, ev: TokenEvent, prompt_ids: list[int]) -> pb.TokenChunk:
    """One generated token as its TokenChunk: its choice, text, finish and any logprobs (the
    prompt's, with its ids, on the first)."""
    chunk = pb.TokenChunk(
        work_id=work_id, token_ids=[ev.token_id], text=ev.text, index=ev.row, finish_reason=ev.finish_reason or ""
    )
    if ev.logprob is not None:
        chunk.logprobs.append(logprob_message(plain(ev.logprob)))
    if ev.prompt:
        chunk.prompt_logprobs.extend(logprob_message(plain(p)) for p in ev.prompt)
        chunk.prompt_token_ids.extend(prompt_ids)
    return chunk
