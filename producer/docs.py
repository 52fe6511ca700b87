"""The interactive API documentation (Swagger UI), served with its own assets.

FastAPI's default page loads Swagger UI's script and stylesheet from a CDN, so it stays blank
on a machine without internet access. Here the assets come from the ``swagger-ui-bundle``
package and are served by the app itself, under ``/docs/assets``. Like ``/healthz``, the page
and its assets are outside ``/v1`` and need no API key.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def add_offline_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` from local assets; the app must be built with
    ``docs_url=None`` so that FastAPI's CDN page is not registered too."""
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_ui_path), name="swagger-ui-assets")

    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        assets = root + ASSETS_PATH
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon-32x32.png",
        )

    # A plain route, as FastAPI's own docs page is: not an API operation.
    app.add_route(DOCS_PATH, docs, include_in_schema=False)
