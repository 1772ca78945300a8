"""Flashing: install the agent and its model onto an edge device (`tandem agent flash`).

The operator's side: pre-flight checks over the device's facts, the payload (model bundle, the
agent's wheel and its pinned dependencies, config, service unit), a resumable checksummed copy,
A/B slots with health-checked rollback. It talks to the device through a `Target` (ssh://, dir:)
and to the hub through the SDK's protocol; it never imports the hub or the agent.
"""
