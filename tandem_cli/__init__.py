"""The `tandem` command: one module per command group (hub, agent, models, devices, generate,
optimize), each registering its sub-commands with `register(subparsers)`; `main` assembles them.

This is the only package that imports all the others. The SDK (`tandem`) stays free of it, so an
application that installs the SDK to call a hub does not import torch.
"""
