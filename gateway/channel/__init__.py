"""The mutual-TLS channel: aiohttp server per listener, and the client to peers."""
