"""``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc), served without the internet.

FastAPI's own pages load their scripts and styles from a public CDN, so on a machine without
internet access they are blank. Here both pages load the copies of Swagger UI and ReDoc that the
``fastapi-offline`` package installs, served by this server under :data:`ASSETS_PATH`, and their
Content-Security-Policy lets the browser load nothing from any other origin (ReDoc's sidebar
would otherwise fetch its vendor's logo from the internet).
"""

from __future__ import annotations

import importlib.util

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from server.engine import StartupError

ASSETS_REQUIREMENT = "fastapi-offline>=1.7,<2"  # pyproject.toml's range
# Same origin only. Inline code and eval stay allowed: Swagger UI starts from an inline script,
# both insert inline styles, and ReDoc compiles JSON schema validators with new Function.
ONLY_THIS_ORIGIN = {
    "Content-Security-Policy": "default-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:"
}
# Under /static/ so that the request metrics count them with the page's own assets.
ASSETS_PATH = "/static/docs"
ASSETS_PACKAGE = ("fastapi_offline", "static")
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"


def install_api_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/redoc`` on ``app`` from the installed assets.

    ``app`` must be created with ``docs_url=None, redoc_url=None`` (so FastAPI's CDN pages are
    not routed), and this must run before anything is mounted at ``/static`` (the first mount
    that matches a path serves it).
    """
    if app.openapi_url is None:
        raise ValueError("the API docs need the OpenAPI schema: create the app with openapi_url")
    openapi_path = app.openapi_url
    if importlib.util.find_spec(ASSETS_PACKAGE[0]) is None:
        raise StartupError(
            f"the API docs' scripts are not installed: the package {ASSETS_REQUIREMENT!r} is "
            f"missing from this Python ({ASSETS_PACKAGE[0]} cannot be imported); install it "
            "with pip, or reinstall vggserve with its dependencies"
        )
    app.mount(ASSETS_PATH, StaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        """Swagger UI: every operation, with a form to try it."""
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_swagger_ui_html(
            openapi_url=root + openapi_path,
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            # No badge fetched from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers.update(ONLY_THIS_ORIGIN)
        return page

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        """ReDoc: the same schema as one readable page."""
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_redoc_html(
            openapi_url=root + openapi_path,
            title=f"{app.title} - API reference",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )
        page.headers.update(ONLY_THIS_ORIGIN)
        return page
