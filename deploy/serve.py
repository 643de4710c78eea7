"""`iisan serve RUN_DIR`: a small HTTP server over a trained run (FastAPI + uvicorn, the `serve` extra).

    POST /recommend    {"history": ["<id>", ...], "k": 10}  ->  {"items": [{"id", "title", "score"}, ...]}
    GET  /items/{id}   ->  {"id", "title", "image"}  (image: a URL under /images/ when the dataset has one)
    GET  /users/{id}   ->  {"user", "history": [{"id", "title", "image"}], "items": [...]}  (?k=10)
    GET  /health       ->  {"status": "ok", "run", "dataset", "method", "items", "users"}
    GET  /             ->  a page: pick a dataset user or type item ids; history and recommendations side by side

Bad input gets a 4xx whose `detail` names the problem: an unknown item or user id (404 for a path, 400 in a
history), k outside 1..items, an empty history or one longer than `max_history`, malformed JSON (422).
Requests are answered one at a time on the model (a lock), each in a worker thread. (No `from __future__ import
annotations` here: FastAPI reads the request model from the endpoint's annotations at runtime.)
"""


import threading
from pathlib import Path
from typing import Any

from iisan.deploy.run import RecommendError, TrainedRun

MAX_HISTORY = 200


def create_app(run: TrainedRun, max_history: int = MAX_HISTORY):
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import FileResponse, HTMLResponse
        from pydantic import BaseModel, Field
    except ImportError:
        from iisan.errors import IisanError

        raise IisanError("iisan serve needs FastAPI and uvicorn: pip install 'iisan-versa[serve]'") from None

    lock = threading.Lock()
    images = run.dataset.images

    class RecommendRequest(BaseModel):
        history: list[str] = Field(description="raw item ids, oldest first")
        k: int = Field(10, description="how many items")

    app = FastAPI(title=f"IISAN-Versa: {run.dataset.name} ({run.cfg.method})")

    def item_view(item_id: str) -> dict[str, Any]:
        j = run.index[item_id]
        has_image = images is not None and images.get(item_id) is not None
        return {"id": item_id, "title": run.titles[j - 1], "image": f"/images/{item_id}" if has_image else None}

    def ranked(histories, k, exclude=None, windows=None):
        with lock:
            if windows is not None:
                return run.rank(windows, exclude, k)
            return run.recommend(histories, k)

    def view(recs) -> list[dict[str, Any]]:
        return [{**item_view(r.id), "score": r.score} for r in recs]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "run": str(run.run_dir), "dataset": run.dataset.name, "method": run.cfg.method,
                "seed": run.seed, "items": len(run.item_ids), "users": run.split.n_users}

    @app.post("/recommend")
    def recommend(request: RecommendRequest) -> dict[str, Any]:
        if not request.history:
            raise HTTPException(400, "history is empty: give at least one item id")
        if len(request.history) > max_history:
            raise HTTPException(400, f"history has {len(request.history)} items; at most {max_history}")
        try:
            recs = ranked([request.history], request.k)[0]
        except RecommendError as e:
            raise HTTPException(400, str(e)) from None
        return {"items": view(recs)}

    @app.get("/items/{item_id}")
    def item(item_id: str) -> dict[str, Any]:
        if item_id not in run.index:
            raise HTTPException(404, f"unknown item id {item_id!r}")
        return item_view(item_id)

    @app.get("/images/{item_id}")
    def image(item_id: str):
        path = images.get(item_id) if images is not None and item_id in run.index else None
        if path is None:
            raise HTTPException(404, f"no image for item id {item_id!r}")
        return FileResponse(path)

    @app.get("/users/{user_id}")
    def user(user_id: str, k: int = 10) -> dict[str, Any]:
        try:
            ids, windows, exclude = run.dataset_requests([user_id], "next")
        except RecommendError as e:
            raise HTTPException(404, str(e)) from None
        try:
            recs = ranked(None, k, exclude, windows)[0]
        except RecommendError as e:
            raise HTTPException(400, str(e)) from None
        return {"user": user_id, "history": [item_view(run.item_ids[j - 1]) for j in exclude[0]],
                "items": view(recs)}

    @app.get("/users")
    def users() -> dict[str, Any]:
        return {"users": list(run.split.user_ids)}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{TITLE}}", f"{run.dataset.name} · {run.cfg.method}")

    return app


def start_server(run_dir: str, timeout: float = 120.0):
    """`iisan serve RUN_DIR` as a child process on a free 127.0.0.1 port, once /health answers: (process, base
    URL). For the UI check and the serving bench; the caller terminates the process."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "iisan.cli", "serve", str(run_dir), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            return server, base
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.terminate()
                raise RuntimeError(f"iisan serve {run_dir} did not start") from None
            time.sleep(0.5)


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, seed: int | None = None) -> None:
    import uvicorn

    from iisan.deploy.run import load_run

    uvicorn.run(create_app(load_run(run_dir, seed)), host=host, port=port, log_level="info")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>IISAN-Versa: {{TITLE}}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
 h1 { font-size: 1.3rem; } form { margin: 0.5rem 0 1rem; display: flex; gap: 0.5rem; flex-wrap: wrap; }
 input { padding: 0.3rem; } #cols { display: flex; gap: 2rem; }
 .col { flex: 1; } .col h2 { font-size: 1.05rem; border-bottom: 1px solid #ccc; }
 ol { padding-left: 1.4rem; } li { margin: 0.35rem 0; display: list-item; }
 li img { height: 64px; vertical-align: middle; margin-right: 0.5rem; border-radius: 3px; }
 .score { color: #777; font-size: 0.85em; } .error { color: #b00; }
</style></head>
<body>
<h1>IISAN-Versa recommendations: {{TITLE}}</h1>
<form id="by-user"><label>dataset user <input id="user" list="users" placeholder="user id"></label>
 <datalist id="users"></datalist><button>show</button></form>
<form id="by-items"><label>or item ids <input id="items" size="40" placeholder="ID ID ..."></label>
 <button>recommend</button></form>
<p id="error" class="error"></p>
<div id="cols"><div class="col"><h2>History</h2><ol id="history"></ol></div>
<div class="col"><h2>Recommended</h2><ol id="recs"></ol></div></div>
<script>
const $ = (id) => document.getElementById(id);
function row(item, score) {
  const li = document.createElement("li");
  if (item.image) { const img = document.createElement("img"); img.src = item.image; img.alt = ""; li.append(img); }
  li.append(document.createTextNode(item.title || item.id));
  const id = document.createElement("span"); id.className = "score";
  id.textContent = " (" + item.id + (score === undefined ? "" : ", " + score.toFixed(2)) + ")"; li.append(id);
  return li;
}
function show(history, recs) {
  $("history").replaceChildren(...history.map((i) => row(i)));
  $("recs").replaceChildren(...recs.map((i) => row(i, i.score)));
}
async function call(url, options) {
  $("error").textContent = "";
  const r = await fetch(url, options); const body = await r.json();
  if (!r.ok) { $("error").textContent = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); return null; }
  return body;
}
$("by-user").onsubmit = async (e) => { e.preventDefault();
  const b = await call("/users/" + encodeURIComponent($("user").value.trim()));
  if (b) show(b.history, b.items); };
$("by-items").onsubmit = async (e) => { e.preventDefault();
  const ids = $("items").value.split(/[\\s,]+/).filter(Boolean);
  const b = await call("/recommend", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify({history: ids, k: 10})});
  if (!b) return;
  const history = []; for (const id of ids) { const it = await call("/items/" + encodeURIComponent(id)); if (it) history.push(it); }
  show(history, b.items); };
call("/users").then((b) => { if (!b) return;
  $("users").replaceChildren(...b.users.slice(0, 2000).map((u) => { const o = document.createElement("option"); o.value = u; return o; }));
  if (b.users.length) { $("user").value = b.users[0]; $("by-user").requestSubmit(); } });
</script></body></html>
"""
