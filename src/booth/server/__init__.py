"""`booth serve`: an AUTOMATIC1111-compatible REST server (`/sdapi/v1`) with a persistent job queue (`/booth/v1`).

`booth.server.app.create_app(ServerConfig(...))` builds the FastAPI app; `booth.server.cli` registers the command.
Nothing is imported here, so `booth` works without the optional `serve` extra (FastAPI, uvicorn).
"""
