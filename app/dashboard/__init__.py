"""steptune.dashboard: a local, read-only web app over the database (NFE-quality fronts, search
efficiency, trials, schedules step by step, relaxation studies, exports)."""

from .app import DEFAULT_HOST, DEFAULT_PORT, create_app, open_read_only

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "create_app", "open_read_only"]
