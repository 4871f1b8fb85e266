"""The HTTP front end: FastAPI over :mod:`inference` (no numerics here).

``python -m server`` starts it with uvicorn; :func:`server.main.create_app` builds the app for
tests and other ASGI servers.
"""
