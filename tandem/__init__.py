"""Tandem: edge-cloud collaborative inference for small language models.

The SDK (hub client) arrives with the hub; this package holds the `tandem` command.
"""

__version__ = "0.1.0"
