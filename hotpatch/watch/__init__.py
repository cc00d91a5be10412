"""Watch mode: file events -> debounced change sets -> the engine.

Owns turning saves on disk into patches: ``watcher`` (the watchdog observer, the worker thread and
the public ``watch()``), ``debounce`` (pure: a burst of events becomes one batch) and ``pathfilter``
(pure: which paths are sources, which are editor droppings or virtualenvs). ``debounce`` and
``pathfilter`` are also used by the gunicorn master's watch option.

May import: ``hotpatch.engine``, ``hotpatch.errors``, watchdog. Never imports control, gunicorn,
cli or demo.

``Watcher``, ``WatchEvent`` and ``watch`` load on first use: the gunicorn master imports only the
pure helpers, and so pays for neither watchdog nor the engine.
"""

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from hotpatch.watch.watcher import Watcher, WatchEvent, watch

__all__ = ["WatchEvent", "Watcher", "watch"]

if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        import importlib

        if name not in __all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module("hotpatch.watch.watcher"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


del TYPE_CHECKING  # not a public name
