"""keyplane.server.services: thin servicers (validate, convert, call the domain, convert back)."""
