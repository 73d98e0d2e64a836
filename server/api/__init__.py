"""The HTTP edge: FastAPI app, pydantic schemas, routes. Converts to/from engine types here only."""
