"""``GET /``: the web page (static HTML, CSS and JS from ``server/static``, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["page"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The single-page demo: drop an image, see the fused top-5 and the score map."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
