"""`make bench-serve RUN=RUN_DIR`: requests per second and p50 / p99 latency of POST /recommend on 127.0.0.1 at
1 and 16 concurrent clients. A bounded load loop: each client sends `--requests` requests (histories of dataset
users, k = 10) and stops; the server is started and stopped by the script."""

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request

from iisan.deploy.serve import start_server


def _post(url: str, body: dict) -> float:
    data = json.dumps(body).encode()
    began = time.perf_counter()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        response.read()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--out", default="", help="report file [default: reports/bench-serve-<dataset>.md]")
    args = parser.parse_args()
    server, base = start_server(args.run_dir)
    try:
        users = json.load(urllib.request.urlopen(base + "/users"))["users"]
        histories = [[h["id"] for h in json.load(urllib.request.urlopen(f"{base}/users/{u}"))["history"]][-10:]
                     for u in users[:100]]
        for _ in range(20):  # warm-up
            _post(base + "/recommend", {"history": histories[0], "k": 10})
        health = json.load(urllib.request.urlopen(base + "/health"))
        lines = [f"# Serving {health['dataset']} ({health['method']}, {health['items']:,} items)", "",
                 f"- command: `python -m iisan.deploy.bench_serve {args.run_dir} --clients {args.clients} "
                 f"--requests {args.requests}` ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)",
                 f"- POST /recommend, k = 10, histories: the last 10 items of 100 dataset users; one uvicorn "
                 f"worker, the load loop in the same machine's other process", "",
                 "| clients | requests | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        print("\n".join(lines[-2:]))
        for clients in [int(c) for c in args.clients.split(",")]:
            latencies: list[float] = []
            lock = threading.Lock()

            def client(n: int) -> None:
                mine = [_post(base + "/recommend", {"history": histories[(n * 7 + i) % len(histories)], "k": 10})
                        for i in range(args.requests)]
                with lock:
                    latencies.extend(mine)

            threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
            began = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - began
            q = statistics.quantiles(latencies, n=100)
            lines.append(f"| {clients} | {len(latencies):,} | {len(latencies) / wall:.0f} | {1000 * q[49]:.1f} | "
                         f"{1000 * q[98]:.1f} |")
            print(lines[-1])
        from pathlib import Path

        out = Path(args.out or f"reports/bench-serve-{health['dataset']}.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
