"""The chat page: GET / answers web/index.html, /ui/* its script, styles and KaTeX fonts.

The files are built from the repository's web/ (npm + esbuild) and ship inside the package, so serving
them needs no Node.js. The page is static: it never carries the API key, which the browser keeps and sends
to /v1/* like any other client.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

WEB = Path(__file__).with_name("web")

# Replies are rendered as sanitised HTML; this policy is the second fence: no script but the page's own,
# no requests to other hosts (an injected image cannot carry the conversation away), no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def page(request: Request) -> Response:
    index = WEB / "index.html"
    if not index.is_file():
        return PlainTextResponse("the chat page is not built: run `npm ci && npm run build` in web/ "
                                 "(or start the server with --no-ui)", status_code=503)
    return FileResponse(index, headers=PAGE_HEADERS)


def ui_routes() -> list[BaseRoute]:
    return [Route("/", page, methods=["GET", "HEAD"]),
            Mount("/ui", app=StaticFiles(directory=WEB / "ui", check_dir=False), name="ui")]
