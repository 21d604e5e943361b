"""Run shell commands from a notebook in real, limited, observable Linux containers."""

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, object]]:
    """Name the server extension; its module is imported only when the server loads it."""
    from .server_ext import LinuxWorkerApp

    return [{"module": "jupyter_linuxworker.server_ext", "app": LinuxWorkerApp}]


def load_ipython_extension(ipython: object) -> None:
    """Register %%linuxjob and %linuxjob (run by `%load_ext jupyter_linuxworker`)."""
    from .magics import LinuxJobMagics

    ipython.register_magics(LinuxJobMagics)  # type: ignore[attr-defined]
