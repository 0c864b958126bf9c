"""The model host: the spawned child process that owns a model, and its handle in asyncio."""
