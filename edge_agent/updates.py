"""Over-the-air updates, the agent's handling: a command arrives, its bundle is swapped in, the hub is told.

`Updater` is a mixin of edge_agent.agent.Agent. Commands arrive on the device's MQTT `commands`
topic in paho's thread and are handled on the agent's loop; each is taken once (QoS 1 delivers at
least once) and updates run one at a time. Fetching, verifying and loading the bundle are
edge_agent.ota's; what is here is the agent's part: swapping the served model between requests,
remembering it for a restart, and reporting the UpdateResult (and then a fresh Hello) on the work
channel, or on the next one when none is open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from edge_agent.credentials import Credentials
from edge_agent.ota import ServedLoader, UpdateCommand, UpdateFailed, fetch_bundle, load_update, save_served
from models.serving import ServedModel
from tandem.v1 import tandem_pb2 as pb

if TYPE_CHECKING:
    from edge_agent.agent import AgentConfig

log = logging.getLogger("tandem.agent")


class Updater:
    """The agent's over-the-air updates, from command to report (mixed into edge_agent.agent.Agent)."""

    # Set by Agent.__init__ and Agent.run (what each one holds is said there).
    config: AgentConfig
    engine: ServedModel
    loader: ServedLoader
    channel: grpc.aio.Channel | None
    creds: Credentials | None
    _loop: asyncio.AbstractEventLoop | None
    _outbox: asyncio.Queue | None
    _unsent: list[pb.AgentMessage]
    _commands: set[str]
    _update_lock: asyncio.Lock
    _updates: set[asyncio.Task]
    hello: Callable[[], pb.AgentMessage]
    """Agent.hello: what the agent serves, reported again after an update."""

    def _command_arrived(self, payload: bytes) -> None:
        """A message on the device's commands topic, in paho's thread: handled on the agent's loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_command, payload)

    def _on_command(self, payload: bytes) -> None:
        try:
            command = UpdateCommand.from_payload(payload)
        except ValueError as exc:
            log.warning("ignoring a malformed command: %s", exc)
            return
        if command.command_id in self._commands:
            return
        self._commands.add(command.command_id)
        task = asyncio.create_task(self.update(command))
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)

    async def update(self, command: UpdateCommand) -> pb.UpdateResult:
        """Fetch, verify and load `command`'s bundle and serve it from the next request on: requests
        running now finish on the model they started with (each takes `self.engine` once, at its
        start). Reports an UpdateResult to the hub, then, on success, a fresh Hello. A failure leaves
        the model served as it was. One update at a time."""
        async with self._update_lock:
            try:
                if self.channel is None or self.creds is None:
                    raise UpdateFailed("not connected to the hub")
                bundles = self.config.state_dir / "bundles"
                bundle = await fetch_bundle(self.channel, self.creds.metadata(), command, bundles)
                served = await asyncio.to_thread(load_update, self.loader, command, bundle)
            except UpdateFailed as exc:
                log.warning("update %s failed: %s", command.command_id, exc)
                result = pb.UpdateResult(command_id=command.command_id, ok=False, message=str(exc), model=command.model)
            else:
                self.engine = served
                save_served(self.config.state_dir, command.model, bundle)  # a restart serves it too
                message = f"serving {command.model} ({served.info['quant']}, version {command.version[:12]})"
                result = pb.UpdateResult(command_id=command.command_id, ok=True, message=message,
                                         model=command.model, version=command.version)  # fmt: skip
                log.info("update %s: %s", command.command_id, message)
            self._report(pb.AgentMessage(update=result))
            if result.ok:
                self._report(self.hello())
            return result

    def _report(self, msg: pb.AgentMessage) -> None:
        """Send `msg` on the open work channel; an UpdateResult waits for the next one if none is open
        (a Hello needs no keeping: each channel opens with a fresh one)."""
        if self._outbox is not None:
            self._outbox.put_nowait(msg)
        elif msg.WhichOneof("kind") == "update":
            self._unsent.append(msg)
