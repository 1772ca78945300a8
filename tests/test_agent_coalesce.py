"""The agent's writer merges each work's queued tokens into one message (edge_agent.messages.coalesce)."""

from __future__ import annotations

from edge_agent.messages import coalesce
from tandem.v1 import tandem_pb2 as pb


def _tokens(work: str, ids: list[int], text: str) -> pb.AgentMessage:
    return pb.AgentMessage(tokens=pb.TokenChunk(work_id=work, token_ids=ids, text=text))


def _replay(messages: list[pb.AgentMessage]) -> dict[str, tuple[list[int], str, str]]:
    """What the hub reconstructs per work: (ids, text, how it ended)."""
    works: dict[str, tuple[list[int], str, str]] = {}
    for msg in messages:
        kind = msg.WhichOneof("kind")
        if kind == "pong":
            continue
        item = getattr(msg, kind)
        ids, text, end = works.get(item.work_id, ([], "", ""))
        assert not end, f"{item.work_id}: a message after its end"
        if kind == "tokens":
            works[item.work_id] = (ids + list(item.token_ids), text + item.text, "")
        else:
            works[item.work_id] = (ids, text, kind)
    return works


def test_each_works_queued_tokens_become_one_message_in_order() -> None:
    queued = [
        _tokens("a", [1], "He"),
        _tokens("b", [7], "x"),
        _tokens("a", [2, 3], "llo"),
        pb.AgentMessage(pong=pb.Pong(sent_unix=1.0)),
        _tokens("b", [8], "y"),
        _tokens("a", [4], "!"),
        pb.AgentMessage(done=pb.WorkDone(work_id="a", finish_reason="eos")),
        _tokens("b", [9], "z"),
        pb.AgentMessage(error=pb.WorkError(work_id="b", code="INTERNAL", message="boom")),
        _tokens("c", [5], "c"),
    ]
    before = _replay([pb.AgentMessage.FromString(m.SerializeToString()) for m in queued])
    merged = coalesce(queued)
    assert [m.WhichOneof("kind") for m in merged] == ["tokens", "tokens", "pong", "done", "error", "tokens"]
    assert (
        _replay(merged)
        == before
        == {
            "a": ([1, 2, 3, 4], "Hello!", "done"),
            "b": ([7, 8, 9], "xyz", "error"),
            "c": ([5], "c", ""),
        }
    )


def test_nothing_to_merge_leaves_the_messages_as_they_were() -> None:
    queued = [_tokens("a", [1], "a"), _tokens("b", [2], "b"), pb.AgentMessage(done=pb.WorkDone(work_id="a"))]
    copies = [pb.AgentMessage.FromString(m.SerializeToString()) for m in queued]
    assert coalesce(queued) == copies
    assert coalesce([]) == []
