"""`iisan data images DIR [--download]`: the images of a dataset folder whose dataset.yaml names an
`image_url_field` (as `iisan data import --from amazon2023` writes), fetched into `DIR/images/<item_id>.<suffix>`.

Resumable: an item that already has an image file there is skipped, so a killed run continues where it
stopped. Each file is checked to decode (PIL) and written through a temporary name, so a file that exists is
whole. An item whose download fails simply has no image: training gives it the missing-image placeholder.
"""

from __future__ import annotations

import io
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from iisan import __version__
from iisan.data.images import IMAGE_SUFFIXES, ImageIndex
from iisan.data.layout import read_dataset_yaml, safe_file_stem, write_dataset_yaml
from iisan.data.readers import read_items
from iisan.data.report import DataReport
from iisan.errors import IisanError
from iisan.registry import locate_dataset

USER_AGENT = f"iisan-versa/{__version__} (dataset image download; Python urllib)"
CONTENT_SUFFIX = {"image/jpeg": ".jpg", "image/jpg": ".jpg", "image/pjpeg": ".jpg", "image/png": ".png"}
MAX_BYTES = 50 << 20
FIRST_FAILURES = 10
IMAGES = "images"


@dataclass
class ImagePlan:
    """Where a dataset folder's images stand: every item, those with a URL, those with an image file, and
    (item id, URL) of each item with a URL and no image yet."""

    folder: Path
    items: int
    with_url: int
    with_image: int
    todo: list[tuple[str, str]]

    def lines(self) -> list[str]:
        return [f"{self.folder}: {self.items:,} items, {self.with_url:,} with an image URL, {self.with_image:,} "
                f"with an image file in {IMAGES}/; {len(self.todo):,} to download (`iisan data images "
                f"{self.folder} --download`)"]


@dataclass
class DownloadResult:
    downloaded: int = 0
    already: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)   # (item id, reason), in items-file order
    yaml_updated: bool = False

    def lines(self) -> list[str]:
        lines = [f"downloaded {self.downloaded:,}, already there {self.already:,}, failed {len(self.failed):,}"]
        if self.failed:
            lines.append("first failures (these items take the missing-image path):")
            lines += [f"  {item_id}: {why}" for item_id, why in self.failed[:FIRST_FAILURES]]
        if self.yaml_updated:
            lines.append(f"added `images: [{IMAGES}]` to dataset.yaml")
        return lines


def plan_images(folder: Path) -> ImagePlan:
    """Read the folder's items and its `image_url_field`; count URLs and the image files already there."""
    location = locate_dataset(str(folder))
    url_field = location.entry.image_url_field
    if not url_field:
        raise IisanError(f"{folder}: dataset.yaml names no image_url_field (a column of image URLs); "
                         f"`iisan data import --from amazon2023` writes one")
    items = read_items(location.items_file, location.entry.fields, DataReport())
    images = folder / IMAGES
    index = ImageIndex.build([images]) if images.is_dir() else ImageIndex((), {})
    with_url = with_image = 0
    todo: list[tuple[str, str]] = []
    for item_id, url in zip(items.ids, items.fields[url_field]):
        url = url.strip()
        with_url += bool(url)
        if item_id in index:
            with_image += 1
        elif url:
            todo.append((item_id, url))
    return ImagePlan(folder, len(items), with_url, with_image, todo)


def _suffix(content_type: str, url: str) -> str:
    """From the content type, else the URL's own suffix, else `.jpg`."""
    if content_type in CONTENT_SUFFIX:
        return CONTENT_SUFFIX[content_type]
    suffix = os.path.splitext(urllib.parse.urlparse(url).path)[1].lower()
    return suffix if suffix in IMAGE_SUFFIXES else ".jpg"


def _get(url: str, timeout: float, retries: int) -> tuple[bytes, str]:
    """The body and content type of a URL. Connection failures, timeouts, 429 and 5xx are retried with
    back-off; any other HTTP error is final. Raises OSError / ValueError with the reason."""
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ValueError("not an http(s) URL")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = response.read(MAX_BYTES + 1)
                if len(data) > MAX_BYTES:
                    raise ValueError(f"larger than {MAX_BYTES >> 20} MiB")
                return data, response.headers.get_content_type()
        except urllib.error.HTTPError as e:
            if (e.code < 500 and e.code != 429) or attempt == retries:
                raise OSError(f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == retries:
                raise OSError(str(getattr(e, "reason", e))) from None
        time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


def fetch_image(item_id: str, url: str, images: Path, timeout: float, retries: int) -> str | None:
    """Download one item's image into `images/<item_id><suffix>`; None, or why it failed."""
    if not safe_file_stem(item_id):
        return "the item id cannot name a file"
    try:
        data, content_type = _get(url, timeout, retries)
    except (OSError, ValueError) as e:
        return str(e)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as e:  # PIL raises many kinds for bad bytes
        return f"not a readable image ({e.__class__.__name__}: {e})"
    tmp = images / f".{item_id}.{threading.get_ident()}.part"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, images / f"{item_id}{_suffix(content_type, url)}")
    finally:
        tmp.unlink(missing_ok=True)
    return None


def _add_images_key(folder: Path) -> bool:
    """List `images` among dataset.yaml's image folders, if it is not; whether the file changed."""
    meta, comment = read_dataset_yaml(folder)
    if not meta and not comment:
        return False  # no dataset.yaml: the default image folder is `images` anyway
    folders = meta.get("images")
    folders = [folders] if isinstance(folders, str) else list(folders or [])
    if IMAGES in folders:
        return False
    meta["images"] = folders + [IMAGES]
    write_dataset_yaml(folder, meta, comment)
    return True


def download_images(folder: Path, log: Callable[[str], None], timeout: float = 30.0, retries: int = 2,
                    workers: int = 8) -> DownloadResult:
    """Download every missing image of the folder's items (`workers` at a time), printing progress."""
    plan = plan_images(folder)
    images = folder / IMAGES
    images.mkdir(exist_ok=True)
    result = DownloadResult(already=plan.with_image)
    order = {item_id: k for k, (item_id, _) in enumerate(plan.todo)}
    failed: dict[str, str] = {}
    log(f"{len(plan.todo):,} images to download ({plan.with_image:,} already there, {plan.items - plan.with_url:,} "
        f"items without a URL), {workers} at a time")
    started = last = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(fetch_image, item_id, url, images, timeout, retries): item_id
                   for item_id, url in plan.todo}
        for done, future in enumerate(as_completed(futures), start=1):
            why = future.result()
            if why is None:
                result.downloaded += 1
            else:
                failed[futures[future]] = why
            now = time.monotonic()
            if now - last >= 2.0 or done == len(futures):
                last = now
                log(f"images {done:,}/{len(futures):,}: {result.downloaded:,} downloaded, {len(failed):,} failed "
                    f"({done / max(now - started, 1e-9):.1f}/s)")
    result.failed = sorted(failed.items(), key=lambda pair: order[pair[0]])
    if result.downloaded or result.already:
        result.yaml_updated = _add_images_key(folder)
    return result
