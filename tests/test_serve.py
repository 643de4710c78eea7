"""`iisan serve` over real HTTP on 127.0.0.1: answers equal `iisan recommend`'s, 50 concurrent requests all
answered correctly, bad requests answered 4xx with the problem named, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from iisan.cli import main as iisan_cli

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IISAN_PIPELINES", str(world / "pipelines.yaml"))
        mp.setenv("IISAN_DATA_DIR", str(world / "data"))
        yield from _serve(world, tmp_path_factory.mktemp("serve"))


def _serve(env, tmp_path):
    from iisan.deploy.run import load_run
    from iisan.deploy.serve import create_app

    train = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--cache", str(env / "cache"), "--out",
                                           str(tmp_path / "runs"), "--epochs", "1", "--no-progress"])
    assert train.exit_code == 0, train.output
    run_dir = Path(train.output.strip().splitlines()[-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(load_run(run_dir), max_history=30)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", run_dir
    srv.should_exit = True
    thread.join(timeout=10)


def expected(run_dir: Path, args: list[str]) -> list[dict]:
    result = CliRunner().invoke(iisan_cli, ["recommend", str(run_dir), *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_server_answers_as_recommend_does(env, server):
    url, run_dir = server
    with httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["items"] == 120 and health["dataset"] == "toy"
        got = client.post("/recommend", json={"history": ["i001", "i002"], "k": 5}).json()["items"]
        want = expected(run_dir, ["--history", "i001 i002", "--k", "5"])[0]["items"]
        assert [(i["id"], i["title"]) for i in got] == [(i["id"], i["title"]) for i in want]
        assert [i["score"] for i in got] == pytest.approx([i["score"] for i in want], abs=1e-6)
        user = client.get("/users/u3", params={"k": 4}).json()
        assert [i["id"] for i in user["items"]] == [i["id"] for i in expected(run_dir, ["--users", "u3", "--k", "4"])[0]["items"]]
        assert user["history"] and all(set(h) == {"id", "title", "image"} for h in user["history"])
        item = client.get("/items/i000").json()
        assert item["id"] == "i000" and item["image"] == "/images/i000"      # the toy world has even images
        assert client.get("/images/i000").content[:3] == b"\xff\xd8\xff"     # a JPEG
        assert client.get("/items/i001").json()["image"] is None
        page = client.get("/")
        assert page.status_code == 200 and "<title>IISAN-Versa: toy" in page.text and "/recommend" in page.text


@pytest.mark.slow
def test_fifty_concurrent_requests_are_all_answered_correctly(env, server):
    url, run_dir = server
    histories = [[f"i{(7 * n) % 100:03d}", f"i{(11 * n + 3) % 100:03d}"] for n in range(50)]
    want = {tuple(h): [i["id"] for i in expected(run_dir, ["--history", " ".join(h), "--k", "10"])[0]["items"]]
            for h in histories}

    def ask(history):
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/recommend", json={"history": history, "k": 10})
            return history, r.status_code, [i["id"] for i in r.json()["items"]]

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, histories))
    assert all(code == 200 for _, code, _ in answers)
    assert all(ids == want[tuple(h)] for h, _, ids in answers)


@pytest.mark.parametrize("method, path, body, status, message", [
    ("post", "/recommend", {"history": ["i001", "zzz"]}, 400, "unknown item id(s) 'zzz'"),
    ("post", "/recommend", {"history": []}, 400, "history is empty"),
    ("post", "/recommend", {"history": ["i001"] * 31}, 400, "history has 31 items; at most 30"),
    ("post", "/recommend", {"history": ["i001"], "k": 0}, 400, "k 0: between 1 and the 120 ranked items"),
    ("post", "/recommend", {"history": ["i001"], "k": 500}, 400, "k 500: between 1 and the 120"),
    ("post", "/recommend", b"{not json", 422, "JSON decode error"),
    ("post", "/recommend", {"k": 3}, 422, "history"),
    ("get", "/items/nope", None, 404, "unknown item id 'nope'"),
    ("get", "/users/nobody", None, 404, "unknown user id(s) 'nobody'"),
    ("get", "/users/u1?k=0", None, 400, "k 0: between 1"),
])
def test_bad_requests_get_4xx_naming_the_problem_and_the_server_keeps_serving(server, method, path, body, status,
                                                                              message):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as client:
        if isinstance(body, bytes):
            r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        elif method == "post":
            r = client.post(path, json=body)
        else:
            r = client.get(path)
        assert r.status_code == status and message in json.dumps(r.json()["detail"])
        assert client.get("/health").status_code == 200
