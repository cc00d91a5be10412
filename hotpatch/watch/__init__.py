"""Watch mode: file events -> debounced change sets -> the engine.

Owns turning saves on disk into patches: ``watcher`` (the watchdog observer, the worker thread and
the public ``watch()``), ``debounce`` (pure: a burst of events becomes one batch) and ``pathfilter``
(pure: which paths are sources, which are editor droppings or virtualenvs). ``debounce`` and
``pathfilter`` are also used by the gunicorn master's watch option.

May import: ``hotpatch.engine``, ``hotpatch.errors``, watchdog. Never imports control, gunicorn,
cli or demo.
"""

from hotpatch.watch.watcher import Watcher, WatchEvent, watch

__all__ = ["WatchEvent", "Watcher", "watch"]
