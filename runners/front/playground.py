"""The playground: one page at ``GET /`` for trying requests in a browser (docs/playground.md).

The page is plain files in ``runners/front/playground/`` (HTML, CSS, JS modules; no build step),
served from memory under ``/playground/<name>``. It builds its form from ``/openapi.json`` and
talks to the queue routes only, from this origin only: the Content-Security-Policy below forbids
any other host, inline script and inline style, so the page works on a machine with no internet.
"""

from __future__ import annotations

import functools
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

PAGE_DIR = Path(__file__).parent / "playground"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}

# img-src: output images (/files/), previews of uploads (blob:) and sync-mode outputs (data:).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidated: a server upgrade never leaves an old page behind
}


@functools.cache
def page_files() -> dict[str, tuple[bytes, str]]:
    """Every file of the page by name, read once: only these names are served."""
    return {
        path.name: (path.read_bytes(), MEDIA_TYPES[path.suffix])
        for path in sorted(PAGE_DIR.iterdir())
        if path.suffix in MEDIA_TYPES
    }


def serve(name: str) -> Response:
    found = page_files().get(name)
    if found is None:
        return Response("no such file", status_code=404, media_type="text/plain", headers=HEADERS)
    body, media_type = found
    return Response(body, media_type=media_type, headers=HEADERS)


async def index(request: Request) -> Response:
    return serve("index.html")


async def asset(request: Request) -> Response:
    return serve(request.path_params["name"])
