"""`make check-ui RUN=RUN_DIR`: start `iisan serve` on 127.0.0.1, load its page in headless Chromium (Debian's
`chromium` package) and save a screenshot (reports/ui-<dataset>.png); prints what the page's API returned so
the picture can be checked against it. A manual check, not part of CI."""

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from iisan.deploy.serve import start_server


def main(run_dir: str, out: str = "") -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("check-ui needs Chromium: apt-get install chromium", file=sys.stderr)
        return 2
    server, url = start_server(run_dir)
    try:
        health = json.load(urllib.request.urlopen(url + "/health", timeout=10))
        first = json.load(urllib.request.urlopen(url + "/users", timeout=10))["users"][0]
        shown = json.load(urllib.request.urlopen(f"{url}/users/{first}", timeout=30))
        path = Path(out or f"reports/ui-{health['dataset']}.png").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1280,1400", "--virtual-time-budget=15000", f"--screenshot={path}", url + "/"],
                       check=True, capture_output=True, timeout=120)
        print(f"screenshot: {path}")
        print(f"user {first}: history {[h['title'] for h in shown['history']]}")
        print(f"recommended: {[i['title'] for i in shown['items']]}")
        print(f"posters: {sum(1 for i in shown['history'] + shown['items'] if i['image'])} of "
              f"{len(shown['history']) + len(shown['items'])} shown items have one")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
