"""The peers signd is measured against, on the same machine and key type.

Two programs do signd's job over a Unix socket and are in Debian:

* **p11-kit's server** remotes a PKCS#11 token: ``p11-kit server`` listens on a
  socket and forks one ``p11-kit-remote`` per connection, which loads the real
  module (SoftHSM) and serves the client's ``p11-kit-client.so``.  Clients are
  separate processes, each with its own connection, login and session, signing
  a 32-byte digest with ``CKM_ECDSA`` on the same ECDSA P-256 key as signd.
* **ssh-agent** holds an ECDSA P-256 key in memory and signs what one client
  sends it over the agent protocol (draft-miller-ssh-agent).  It never touches
  the token, so it is a floor for "a signing service behind a socket", not a
  like-for-like PKCS#11 comparison; its row says so.  Next to it, in the same
  run, signd's own ssh-agent socket (``[agent]``) signs the same data with the
  token's P-256 key (``measure_signd_agent``).

Each ``measure_*`` function returns one :class:`~signd_bench._measure.Row`, with
the server side's CPU time (the server and its children over the measured
interval) and peak RSS.  Every row is checked: the last signature of each client
is verified with ``cryptography`` before the row is returned.

Every wait has a deadline, every process started here is stopped (by pid) and
every temporary file and socket is removed, whatever happens.  Something that
cannot start raises :class:`PeerUnavailable`; a peer that answers wrongly raises
:class:`PeerError` (:class:`PeerBadSignature` for a signature that does not
verify).
"""

from __future__ import annotations

from ._peer_support import DIGEST, PeerBadSignature, PeerError, PeerUnavailable
from .p11kit import measure_p11kit_server, p11kit_available, p11kit_client_module
from .ssh_agent import measure_signd_agent, measure_ssh_agent, ssh_agent_available

__all__ = [
    "DIGEST",
    "PeerBadSignature",
    "PeerError",
    "PeerUnavailable",
    "measure_p11kit_server",
    "measure_signd_agent",
    "measure_ssh_agent",
    "p11kit_available",
    "p11kit_client_module",
    "ssh_agent_available",
]
