"""The ssh-agent front end: signd keys for ssh, git and ssh-keygen (``[agent]``).

``wire`` is the protocol (sans-IO), ``front`` the socket's server, ``sockets``
where its listening socket comes from.
"""
