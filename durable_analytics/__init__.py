"""durable_analytics: analytics events queued on disk before `track()` returns.

A process that dies loses nothing `track()` returned for: the next process to open the same
queue sends it. See README.md and docs/.
"""

from ._default import (
    alias,
    configure,
    default_client,
    flush,
    group,
    identify,
    page,
    screen,
    set_consent,
    set_user_properties,
    shutdown,
    track,
)
from ._version import __version__
from .client import Analytics, ConsentState, ErrorListener
from .config import Config
from .context import (
    analytics_context,
    get_context,
    track_server_action,
    track_server_page_view,
    with_analytics_context,
)
from .errors import (
    ClosedError,
    ConfigurationError,
    DeliveryError,
    DurableAnalyticsError,
    StorageError,
    TransportError,
    ValidationError,
)
from .queue.paths import state_dir
from .stats import DroppedCounts, StatsSnapshot
from .transport import HTTPTransport, InMemoryTransport, Transport, TransportResponse

__all__ = [
    "Analytics",
    "ClosedError",
    "Config",
    "ConfigurationError",
    "ConsentState",
    "DeliveryError",
    "DroppedCounts",
    "DurableAnalyticsError",
    "ErrorListener",
    "HTTPTransport",
    "InMemoryTransport",
    "StatsSnapshot",
    "StorageError",
    "Transport",
    "TransportError",
    "TransportResponse",
    "ValidationError",
    "__version__",
    "alias",
    "analytics_context",
    "configure",
    "default_client",
    "flush",
    "get_context",
    "group",
    "identify",
    "page",
    "screen",
    "set_consent",
    "set_user_properties",
    "shutdown",
    "state_dir",
    "track",
    "track_server_action",
    "track_server_page_view",
    "with_analytics_context",
]
