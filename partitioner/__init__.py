"""Tandem partitioner: see docs/ and the open issues; grows with the hub/agent work.

`partitioner.cost` predicts TTFT, time per output token and edge energy of a request on a device profile.
"""
