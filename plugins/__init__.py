"""keyplane.plugins: the key-backend plugin system (hookspecs, facade) and the built-in backends."""
