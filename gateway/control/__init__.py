"""The local control socket: operator commands reach the running daemon here.

A unix socket (``<state_dir>/control.sock``, mode 0600) that only the medgw
user (and root) can open; the caller's uid is read from the socket
(SO_PEERCRED) and recorded with every action in the audit trail.
"""

SOCKET_NAME = "control.sock"
