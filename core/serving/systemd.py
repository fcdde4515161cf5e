"""What the bot tells systemd as it starts and stops (``Type=notify`` in deploy/flamingo-bot.service).

Why: told nothing, systemd knew only that the process had started. ``systemctl start`` returned while
the model was still loading (minutes), units ordered after the bot started before it answered, and
``systemctl status`` could not say what the bot was doing. The notify protocol is one datagram of
``KEY=value`` lines to the socket systemd names in ``NOTIFY_SOCKET``; run any other way (a terminal,
a container) the bot sends nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``fields`` (``READY=1``, ``STATUS=...``, ``STOPPING=1``) to the service manager; False where
    none listens or the message could not be sent (logged: the bot runs on all the same)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket's name
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
            manager.connect(address)
            manager.sendall("\n".join(fields).encode())
    except OSError as error:
        log.warning("could not tell the service manager %s: %s", ", ".join(fields), error)
        return False
    return True
