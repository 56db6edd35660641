"""Development tools: the local collector, its event debugger page, the queue view, the demo.

Never imported by ``import durable_analytics`` or by a service: the CLI loads these modules
only for the commands that need them (``collect``, ``ui``, ``demo``).
"""
