"""Requests to answers: dispatch, reads, signing, admin operations, lifecycle. No sockets."""
