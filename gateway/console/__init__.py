"""The web console at /ui: adapters and versions, alias history, live rollouts and cost, with the
admin actions of the CLI. Served by the gateway, or on its own by ``loragate ui``."""

from .app import create_console_app, mount_console

__all__ = ["create_console_app", "mount_console"]
