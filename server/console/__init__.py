"""keyplane.server.console: the admin console, served by the server itself over HTTPS
(`keyplane serve --console-listen HOST:PORT`). Server-rendered pages; every action is
the RPC it mirrors, called in process as the signed-in identity (calls.py)."""
