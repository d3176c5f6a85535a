"""The chat page `lfm2vl serve` answers at `/` (off with --no-ui): static files from serve/page/, no build step and
nothing from elsewhere, so it works offline. The page talks to the server's own /v1/chat/completions with
streaming; /ui/config.json tells it the server's limits (images per request, bytes per image, the image-token
budget, the default max_tokens) and whether an API key is needed.

Every page response carries a Content-Security-Policy that allows only the server's own script and style files (no
inline script, no other origin; images from blob:/data: URLs for thumbnails), so text the page shows can never run
as code even if a bug rendered it as HTML.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from .settings import ServerSettings

FOLDER = Path(__file__).parent / "page"
TYPES = {"index.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
         "page.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def add_page(app: FastAPI, settings: ServerSettings) -> None:
    """GET / (the page), GET /ui/page.js and /ui/page.css, GET /ui/config.json."""
    files = {name: (FOLDER / name).read_bytes() for name in TYPES}

    def send(name: str) -> Response:
        return Response(files[name], media_type=TYPES[name], headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def index():
        return send("index.html")

    @app.get("/ui/page.js", include_in_schema=False)
    async def script():
        return send("page.js")

    @app.get("/ui/page.css", include_in_schema=False)
    async def style():
        return send("page.css")

    @app.get("/ui/config.json", include_in_schema=False)
    async def config():
        return JSONResponse({
            "api_key_required": bool(settings.api_key), "max_images": settings.max_images,
            "max_image_bytes": settings.media.max_bytes, "max_body_bytes": settings.max_body_bytes,
            "min_image_tokens": settings.min_image_tokens, "max_image_tokens": settings.max_image_tokens,
            "default_max_tokens": settings.default_max_tokens}, headers=HEADERS)
