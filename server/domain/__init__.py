"""keyplane.server.domain: the key hierarchy and the rules that keep it valid."""
