"""Starting Ray the one way steptune does, for its evaluators and its relaxation tables."""

from __future__ import annotations

import logging

# Ray's notice that a new local instance has token authentication on: the instance is steptune's own, started for
# one run, so the notice would only open every run's log with a setting the user did not choose and need not change
_NOTICE = "Token authentication is enabled for this Ray cluster"


def _not_the_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOTICE)


def init_ray(address: str | None) -> None:
    """``ray.init`` without Ray's dashboard, log forwarding or logging set-up. ``address`` None (or "local") starts
    a private local instance, never attaching to a cluster some other process left running (token authentication
    on, as Ray sets every new local instance up, without Ray's notice saying so); any other address attaches to
    that cluster."""
    import ray

    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _not_the_notice not in notices.filters:
        notices.addFilter(_not_the_notice)
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False)
