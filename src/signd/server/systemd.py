"""systemd's service notification protocol (``sd_notify``), without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, the address of a Unix
datagram socket, and the service sends it newline-separated ``KEY=VALUE``
lines:

* ``READY=1`` once the daemon serves: the token is open, the keys are loaded
  and the socket is listening.  Units ordered after ``signd.service`` start
  only then.
* ``STOPPING=1`` when a shutdown begins (SIGTERM/SIGINT).
* ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` (``WatchdogSec=``), from a
  task in the daemon's trio loop: a loop that hangs stops pinging, and
  systemd kills and restarts the service.  ``$WATCHDOG_PID``, when set, must be
  this process's pid, as for ``sd_watchdog_enabled``.
* ``STATUS=...``: one line that ``systemctl status`` shows.

``Notifier.from_environ`` reads those variables and removes them from
``os.environ``, so the token worker processes (which inherit the environment)
never see them.  It must run before the workers are started.  Without
``$NOTIFY_SOCKET`` every method does nothing.

A notification is sent without blocking; one that cannot be sent is logged,
never fatal: the daemon goes on serving.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Final

import trio

__all__ = ["Notifier"]

log = logging.getLogger("signd.systemd")

#: The variables systemd sets for the notification protocol.
ENVIRONMENT: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> str | None:
    """The socket address in ``$NOTIFY_SOCKET``: an absolute path, or an
    abstract name written with a leading ``@``.  None for anything else (such
    as the ``vsock:`` addresses of newer systemd versions)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


@dataclass(frozen=True, slots=True)
class Notifier:
    """Sends notifications to systemd; the default one is disabled."""

    #: Where to send (``\\0``-prefixed for an abstract name); None: nowhere.
    address: str | None = None
    #: Seconds between watchdog pings; None: no watchdog.
    watchdog_interval: float | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for, from ``environ`` (``os.environ``);
        the variables are removed from it."""
        env = os.environ if environ is None else environ
        raw_socket, raw_usec, raw_pid = (env.pop(name, None) for name in ENVIRONMENT)
        if not raw_socket:
            return cls()
        address = _address(raw_socket)
        if address is None:
            log.warning(
                "NOTIFY_SOCKET is not a Unix socket path or abstract name; not notifying",
                extra={"notify_socket": raw_socket},
            )
            return cls()
        interval = None
        if raw_usec is not None and raw_pid in (None, str(os.getpid())):
            try:
                usec = int(raw_usec)
            except ValueError:
                usec = 0
            if usec > 0:
                interval = usec / 2 / 1e6
            else:
                log.warning(
                    "WATCHDOG_USEC is not a positive integer; no watchdog pings",
                    extra={"watchdog_usec": raw_usec},
                )
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` fields; whether it was sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            ) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            log.warning(
                "cannot notify systemd",
                extra={"fields": [f.partition("=")[0] for f in fields], "error": str(exc)},
            )
            return False
        return True

    def ready(self, status: str) -> bool:
        """The daemon serves: ``READY=1`` with a status line."""
        return self.notify("READY=1", f"STATUS={_line(status)}")

    def stopping(self, status: str = "Stopping") -> bool:
        """A shutdown has begun: ``STOPPING=1`` with a status line."""
        return self.notify("STOPPING=1", f"STATUS={_line(status)}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={_line(status)}")

    async def run_watchdog(self) -> None:
        """Ping the watchdog until cancelled (returns at once without one).

        Run it in the daemon's nursery: the pings come from the trio loop
        itself, so a loop that stops running stops them too.
        """
        if self.watchdog_interval is None or self.address is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)


def _line(text: str) -> str:
    """A status is one line: a newline would start another field."""
    return " ".join(text.splitlines())
