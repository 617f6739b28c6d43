"""`qks serve`: a local web page over a query index. Type labels, see the best-matching images with
their scores; click one to see its top tags for the vocabulary typed.

Built on Starlette (routing, responses, files) and served by uvicorn, the `serve` extra
(`pip install 'qks_pipeline[serve]'`). It binds 127.0.0.1 unless told otherwise, serves no file
outside the image root (a path is resolved, symbolic links followed, then refused unless it lies
under the root), and puts every label and path into the page as text (the script sets
`textContent`, never HTML); a Content-Security-Policy allows this server's own script, styles,
images and requests only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qks_pipeline.errors import QKSError
from qks_pipeline.index.index import Index
from qks_pipeline.predict.tagger import clean_labels

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route
except ImportError:  # optional: only `qks serve` needs it
    Starlette = None

NEEDS = "qks serve needs the serve extra: pip install 'qks_pipeline[serve]' (starlette, uvicorn)"
MAX_QUERY = 20_000  # characters of one labels parameter
MAX_TOP = 200  # most images one search returns
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>QKS search</title>
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<h1>QKS search</h1>
<form id="search">
<input id="labels" name="labels" size="50" placeholder="labels, comma-separated: dog, beach ball"
  autofocus>
<input id="vocabulary" name="vocabulary" size="40"
  placeholder="tag vocabulary (blank: the labels searched)">
<button id="go" type="submit">Search</button>
</form>
<p id="status" class="meta"></p>
<div class="panes">
<main id="results" class="grid"></main>
<aside id="tags" hidden><h2 id="tags-image"></h2><ol id="tags-list"></ol></aside>
</div>
</body>
</html>
"""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; background: #f4f5f7; color: #1d2330; }
h1 { font-size: 20px; margin: 0 0 12px; }
form { display: flex; gap: 8px; flex-wrap: wrap; margin-bottom: 8px; }
input { padding: 6px 8px; }
.meta { color: #555; }
.panes { display: flex; gap: 16px; align-items: flex-start; }
.grid { flex: 1; display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr));
  gap: 12px; }
.hit { margin: 0; background: #fff; border-radius: 8px; box-shadow: 0 1px 3px #0002;
  padding: 8px; cursor: pointer; }
.hit img { width: 100%; height: 150px; object-fit: contain; background: #e8eaee; }
.hit .score { font-weight: 600; }
.hit .name { word-break: break-all; color: #555; font-size: 12px; }
aside { width: 280px; background: #fff; border-radius: 8px; padding: 12px; }
aside h2 { font-size: 14px; word-break: break-all; margin: 0 0 8px; }
.error { color: #a33; }
"""

SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const imageUrl = (path) => "/images/" + path.split("/").map(encodeURIComponent).join("/");

function say(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "meta error" : "meta";
}

async function getJson(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function showTags(hit) {
  const vocabulary = $("vocabulary").value.trim() || $("labels").value;
  const query = new URLSearchParams({row: hit.row, labels: vocabulary});
  try {
    const tags = await getJson("/api/tags?" + query);
    $("tags-image").textContent = tags.image;
    const list = $("tags-list");
    list.replaceChildren();
    for (const tag of tags.top) {
      const item = document.createElement("li");
      item.className = "tag";
      item.textContent = tag.label + " " + tag.score.toFixed(3);
      list.appendChild(item);
    }
    $("tags").hidden = false;
  } catch (e) { say(e.message, true); }
}

function card(hit) {
  const figure = document.createElement("figure");
  figure.className = "hit";
  figure.dataset.row = hit.row;
  const img = document.createElement("img");
  img.src = imageUrl(hit.image);
  img.alt = hit.image;
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const each = document.createElement("div");
  each.className = "each";
  each.textContent = Object.entries(hit.scores).map(([l, s]) => l + " " + s.toFixed(3)).join(", ");
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = hit.image;
  figure.append(img, score, each, name);
  figure.addEventListener("click", () => showTags(hit));
  return figure;
}

async function search(event) {
  event.preventDefault();
  say("searching...", false);
  $("tags").hidden = true;
  try {
    const found = await getJson("/api/search?" + new URLSearchParams({labels: $("labels").value}));
    $("results").replaceChildren(...found.hits.map(card));
    say(found.hits.length + " images for " + found.labels.join(" AND "), false);
  } catch (e) {
    $("results").replaceChildren();
    say(e.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => $("search").addEventListener("submit", search));
"""


def _labels(request: Request, key: str = "labels") -> list[str]:
    raw = request.query_params.get(key, "")
    if len(raw) > MAX_QUERY:
        raise QKSError(f"the label list is longer than {MAX_QUERY} characters")
    return raw.split(",")


def _static(text: str, media_type: str) -> Any:
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
    return lambda request: Response(text, media_type=media_type, headers=headers)


def image_file(root: Path, path: str) -> Path | None:
    """The file `path` names under `root`, or None when it is not a file there (`..`, an absolute
    path, a symbolic link that leads out of the root)."""
    try:
        found = (root / path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a loop, a NUL byte
        return None
    return found if found.is_relative_to(root) and found.is_file() else None


def make_app(index: Index, images: str | Path, top: int = 24) -> Starlette:
    """The web app over `index`, with the images under `images` (the image root the index's paths
    are relative to)."""
    if Starlette is None:
        raise QKSError(NEEDS)
    root = Path(images)
    if not root.is_dir():
        raise QKSError("image root is not a directory", root)
    root = root.resolve()
    lock = threading.Lock()  # one scoring at a time: the text tower and its cache are shared

    def answer(work: Any) -> JSONResponse:
        try:
            with lock:
                return JSONResponse(work())
        except QKSError as e:
            return JSONResponse({"error": e.message}, status_code=400)

    def search(request: Request) -> JSONResponse:
        def found() -> dict[str, Any]:
            names, _ = clean_labels(_labels(request))
            hits = index.search(names, min(top, MAX_TOP))
            return {"labels": names, "hits": [hit.to_json() for hit in hits]}

        return answer(found)

    def tags(request: Request) -> JSONResponse:
        def tagged() -> dict[str, Any]:
            try:
                row = int(request.query_params.get("row", ""))
            except ValueError:
                raise QKSError("row must be a whole number") from None
            p = index.tag_rows(_labels(request), [row], top_k=10)[0]
            return p.to_json() | {"row": row}

        return answer(tagged)

    def image(request: Request) -> Response:
        found = image_file(root, request.path_params["path"])
        if found is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(found, headers={"X-Content-Type-Options": "nosniff"})

    routes = [
        Route("/", _static(PAGE, "text/html")),
        Route("/app.js", _static(SCRIPT, "text/javascript")),
        Route("/app.css", _static(CSS, "text/css")),
        Route("/api/search", search),
        Route("/api/tags", tags),
        Route("/images/{path:path}", image),
    ]
    return Starlette(routes=routes)


def serve(
    index: Index,
    images: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    top: int = 24,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve `make_app(index, images, top)` with uvicorn on host:port until interrupted."""
    app = make_app(index, images, top)
    import uvicorn

    echo(f"serving {index.store.path} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
