"""Framework integrations: request tracking middleware, the request context, task queues.

One module per protocol, each importing its framework only when it is itself imported (Celery:
only when `setup` is called), so ``import durable_analytics`` stays free of frameworks (the
core must load in a cron job):

- `durable_analytics.integrations.wsgi`: WSGI middleware (Flask, Bottle, Pyramid, any WSGI app);
- `durable_analytics.integrations.asgi`: ASGI middleware (Starlette, FastAPI, Quart, ...);
- `durable_analytics.integrations.django`: Django middleware configured from settings;
- `durable_analytics.integrations.celery`: ``setup(analytics, celery_app)`` carries the request
  context from task senders to tasks in a header and flushes when workers stop.

The three middlewares record the same ``http_request`` event and bind the same request context
(`durable_analytics.context`); see docs/integrations.md, and docs/celery.md for Celery.
"""

__all__: list[str] = []
