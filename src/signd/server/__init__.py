"""The trio transport: listeners, socket activation, connections, memory budget."""
