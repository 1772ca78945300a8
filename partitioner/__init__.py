"""Tandem partitioner: see docs/ and the open issues; grows with the hub/agent work."""
