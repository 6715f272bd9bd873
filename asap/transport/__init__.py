"""HTTP transport of ASAP: the client, the server app and the bytes between them (spec 3, 4)."""
