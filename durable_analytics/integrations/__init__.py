"""Web framework integrations: request tracking middleware and the request context.

One module per protocol, each importing its framework only when it is itself imported, so
``import durable_analytics`` stays free of web frameworks (the core must load in a cron job):

- `durable_analytics.integrations.wsgi`: WSGI middleware (Flask, Bottle, Pyramid, any WSGI app);
- `durable_analytics.integrations.asgi`: ASGI middleware (Starlette, FastAPI, Quart, ...);
- `durable_analytics.integrations.django`: Django middleware configured from settings.

All three record the same ``http_request`` event and bind the same request context
(`durable_analytics.context`); see docs/integrations.md.
"""

__all__: list[str] = []
