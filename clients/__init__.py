"""keyplane.clients: the typed client, the CLI, and (later) the agent and zone-server runtimes."""
