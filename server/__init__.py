"""keyplane.server: the keyplane gRPC server (config, app, servicers, domain, store)."""
