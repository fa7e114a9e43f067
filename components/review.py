"""The operator review page (``fod review``): flagged parts, a person's verdict on each, and
confirmed images turned into the next data version.

A small web application on 127.0.0.1 over the model server's decision record: a queue of
flagged images, newest first, each with its heatmap overlay, score, threshold and model
version; an operator marks each one good or defective (keys ``g`` and ``d``). Each
verdict is stored with who gave it, when, and whether it confirms or overturns the
model's decision. Publishing copies the parts marked good into the category's training
images and those marked defective into a labelled set (``<category>/labelled/<date>/``),
then ``dvc add`` and ``dvc push`` make a new data version for the retrain check. The
counts view shows, per model version, the confirmed false alarms and defects, and the
share of false alarms among the reviewed parts. It has no login: it binds loopback only
(put it behind the cluster's auth proxy, docs/deploy.md).
"""

import contextlib
import io
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Annotated

from components.serving.records import open_record

log = logging.getLogger(__name__)

publishing = threading.Lock()  # one Publish at a time: a double click must not version twice

DEFAULT_PORT = 8090


class Verdict(str, Enum):
    GOOD = "good"
    DEFECTIVE = "defective"


class ReviewError(ValueError):
    """A request the review store refuses; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReviewStore:
    """Verdicts beside the decisions, in the decision record's SQLite file."""

    record: Path

    @contextlib.contextmanager
    def connect(self):
        """One transaction: committed when the block ends, rolled back on an error."""
        if not Path(self.record).is_file():
            raise ReviewError(f"no decision record at {self.record}", 404)
        connection = open_record(self.record)
        try:
            connection.row_factory = sqlite3.Row
            with connection:
                yield connection
        finally:
            connection.close()

    def queue(self, limit: int = 200) -> list[dict]:
        """Flagged decisions without a verdict, newest first."""
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT d.id, d.time, d.sha256, d.score, d.threshold, d.model_name, "
                "d.model_version, d.data_version, d.image IS NOT NULL AS has_image "
                "FROM decisions d LEFT JOIN verdicts v ON v.decision_id = d.id "
                "WHERE d.is_anomalous = 1 AND v.decision_id IS NULL ORDER BY d.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [dict(r) | {"has_image": bool(r["has_image"])} for r in rows]

    def picture(self, decision_id: int, kind: str) -> bytes:
        if kind not in ("overlay", "thumbnail", "image"):
            raise ReviewError(f"no picture of kind {kind!r}", 404)
        with self.connect() as connection:
            row = connection.execute(
                f"SELECT {kind} FROM decisions WHERE id = ?", (decision_id,)
            ).fetchone()
        if row is None:
            raise ReviewError(f"no decision {decision_id}", 404)
        if row[0] is None:
            raise ReviewError(f"decision {decision_id} has no {kind} kept", 404)
        return bytes(row[0])

    def give(
        self, decision_id: int, verdict: str, reviewer: str, mask: bytes | None = None
    ) -> dict:
        """Store one verdict; a second verdict on the same decision is refused (409)."""
        try:
            verdict = Verdict(verdict)
        except ValueError:
            raise ReviewError(f"verdict must be 'good' or 'defective', not {verdict!r}") from None
        reviewer = (reviewer or "").strip()
        if not reviewer:
            raise ReviewError("say who reviews: a reviewer name is required")
        if mask is not None:
            _check_mask(mask, verdict)
        with self.connect() as connection:
            row = connection.execute(
                "SELECT is_anomalous FROM decisions WHERE id = ?", (decision_id,)
            ).fetchone()
            if row is None:
                raise ReviewError(f"no decision {decision_id}", 404)
            flagged = bool(row["is_anomalous"])
            confirms = flagged == (verdict is Verdict.DEFECTIVE)
            try:
                connection.execute(
                    "INSERT INTO verdicts (decision_id, verdict, reviewer, time, confirms, mask) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (decision_id, verdict.value, reviewer[:100], time.time(), int(confirms), mask),
                )
            except sqlite3.IntegrityError:
                raise ReviewError(f"decision {decision_id} has a verdict already", 409) from None
        return {"decision_id": decision_id, "verdict": verdict.value, "confirms": confirms}

    def counts(self) -> list[dict]:
        """Per model version: decisions, flagged, reviewed, confirmed defects and false
        alarms, and the false alarms among the reviewed parts: only a verdict tells a false
        alarm, so an unreviewed decision says nothing either way and is not counted."""
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT d.model_name, d.model_version, COUNT(*) AS decisions, "
                "SUM(d.is_anomalous = 1) AS flagged, COUNT(v.decision_id) AS reviewed, "
                "SUM(v.verdict = 'defective') AS confirmed_defects, "
                "SUM(d.is_anomalous = 1 AND v.verdict = 'good') AS confirmed_false_alarms, "
                "SUM(d.is_anomalous = 0 AND v.verdict = 'defective') AS missed_defects "
                "FROM decisions d LEFT JOIN verdicts v ON v.decision_id = d.id "
                "GROUP BY d.model_name, d.model_version ORDER BY d.model_name, d.model_version",
            ).fetchall()
        counts = []
        for row in rows:
            entry = {k: v or 0 for k, v in dict(row).items()} | {
                "model_name": row["model_name"],
                "model_version": row["model_version"],
            }
            entry["false_alarms_among_reviewed"] = (
                entry["confirmed_false_alarms"] / entry["reviewed"] if entry["reviewed"] else None
            )
            counts.append(entry)
        return counts

    def publish(self, data_dir: Path, category: str) -> dict:
        """Copy the reviewed images not yet published into the data folder: good ones into
        the training images, defective ones into ``labelled/<date>/`` (with their mask)."""
        good_dir = _training_folder(data_dir, category)
        labelled = data_dir / category / "labelled" / datetime.now(UTC).strftime("%Y-%m-%d")
        written: dict = {"good": 0, "defective": 0, "without_image": 0, "ids": []}
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT v.decision_id, v.verdict, v.mask, d.image, d.sha256 FROM verdicts v "
                "JOIN decisions d ON d.id = v.decision_id WHERE v.published_at IS NULL"
            ).fetchall()
            for row in rows:
                if row["image"] is None:  # the record kept no full image of it
                    written["without_image"] += 1
                    continue
                image = bytes(row["image"])
                name = f"review-{row['sha256'][:16]}{_suffix(image)}"
                folder = good_dir if row["verdict"] == Verdict.GOOD.value else labelled
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(image)
                if row["mask"] is not None:
                    masks = folder / "masks"
                    masks.mkdir(exist_ok=True)
                    (masks / f"{Path(name).stem}.png").write_bytes(bytes(row["mask"]))
                written[row["verdict"]] += 1
                connection.execute(
                    "UPDATE verdicts SET published_at = ?, published_as = ? WHERE decision_id = ?",
                    (time.time(), str(folder / name), row["decision_id"]),
                )
                written["ids"].append(row["decision_id"])
        return written

    def unpublish(self, decision_ids: list[int]) -> None:
        """Mark verdicts as not published again (their data version was not made)."""
        with self.connect() as connection:
            connection.executemany(
                "UPDATE verdicts SET published_at = NULL WHERE decision_id = ?",
                [(i,) for i in decision_ids],
            )


def _training_folder(data_dir: Path, category: str) -> Path:
    """Where the category's good training images are: MVTec layout or folder layout."""
    for candidate in (data_dir / category / "train" / "good", data_dir / category / "good"):
        if candidate.is_dir():
            return candidate
    raise ReviewError(
        f"no training images of {category!r} under {data_dir} (expected {category}/train/good "
        f"or {category}/good)",
        409,
    )


def _suffix(image: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(image)) as opened:
        return {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif"}.get(
            opened.format or "", ".png"
        )


def _check_mask(mask: bytes, verdict: Verdict) -> None:
    from fod_core.processing import ImageDecodeError, read_image

    if verdict is not Verdict.DEFECTIVE:
        raise ReviewError("a mask goes with a 'defective' verdict only")
    try:
        read_image(mask)
    except ImageDecodeError as error:
        raise ReviewError(f"the mask is not an image: {error}") from None


# -- the web application ----------------------------------------------------------------
def create_app(
    store: ReviewStore, *, category: str, data_dir: Path, repo_root: Path, git_push: bool = False
):
    """The FastAPI application: the page, its JSON API and the pictures."""
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title=f"fod review: {category}", docs_url=None, redoc_url=None)

    @app.exception_handler(ReviewError)
    async def refused(request: Request, error: ReviewError):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{category}}", category)

    @app.get("/api/queue")
    def queue() -> list[dict]:
        return store.queue()

    @app.get("/api/decisions/{decision_id}/{kind}.png")
    def picture(decision_id: int, kind: str) -> Response:
        data = store.picture(decision_id, kind)
        suffix = _suffix(data)
        media = {".jpg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff"}
        return Response(data, media_type=media.get(suffix, "image/png"))

    @app.post("/api/decisions/{decision_id}/verdict")
    def verdict(
        decision_id: int,
        verdict: Annotated[str, Form()],
        reviewer: Annotated[str, Form()] = "",
        mask: Annotated[UploadFile | None, File()] = None,
    ) -> dict:  # plain def: SQLite work runs in the thread pool, not on the event loop
        data = mask.file.read() if mask is not None else None
        return store.give(decision_id, verdict, reviewer, data or None)

    @app.get("/api/counts")
    def counts() -> list[dict]:
        return store.counts()

    @app.post("/api/publish")
    def publish() -> dict:
        with publishing:  # one at a time: a double click must not version twice
            written = store.publish(data_dir, category)
            ids = written.pop("ids")
            if not ids:
                return written | {"data_version": None}
            from components.data_version import DvcRepo
            from components.settings import load_settings

            try:
                repo = DvcRepo(repo_root)
                repo.ensure(load_settings())
                version = repo.add_and_push(data_dir)
            except Exception as error:  # the next publish tries these images again
                store.unpublish(ids)
                raise ReviewError(f"dvc add/push failed, nothing published: {error}", 502) from None
            commit = None
            if git_push:  # where the cluster's retrain check (a fresh clone) finds it
                from components.data_version import commit_and_push

                message = (
                    f"review: {written['good']} good, {written['defective']} defective parts of "
                    f"{category} (data version {version.short})"
                )
                try:
                    commit = commit_and_push(repo_root, Path(f"{data_dir}.dvc"), message)
                except Exception as error:
                    store.unpublish(ids)
                    raise ReviewError(
                        f"the data version was pushed but its .dvc file was not: {error}", 502
                    ) from None
        log.info("published %s: data version %s", written, version.md5)
        return written | {"data_version": version.md5, "commit": commit}

    return app


class ShippedImport:
    """On a cluster the decisions are in S3 (the servers ship them): copy the new ones into
    the page's own record every ``interval`` seconds. An S3 outage is logged; the page
    goes on with what it has."""

    def __init__(self, location: str, model_name: str, record: Path, interval: float) -> None:
        self.location, self.model_name, self.record = location, model_name, record
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fod-import", daemon=True)

    def once(self) -> int:
        from components.serving.shipping import import_shipped

        try:
            copied = import_shipped(self.location, self.model_name, self.record)
        except Exception as error:  # S3 down: the next round retries
            log.warning("could not import decisions from %s (%s: %s)", self.location,
                        type(error).__name__, error)  # fmt: skip
            return 0
        if copied:
            log.info("imported %d decisions of %s from %s", copied, self.model_name, self.location)
        return copied

    def start(self) -> None:
        self.once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.once()


def serve_review(
    category: str,
    *,
    record: Path,
    data_dir: Path,
    repo_root: Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    import_from: str | None = None,
    import_interval: float = 30.0,
    git_push: bool = False,
) -> None:
    """Serve the page; with ``import_from`` (the S3 location servers ship to), the record
    is the page's own copy, kept up to date from there. ``git_push``: a published data
    version's ``.dvc`` file is committed and pushed (a cluster's retrain check clones)."""
    import uvicorn

    from components.tracking import registered_name

    importer = None
    if import_from:
        importer = ShippedImport(import_from, registered_name(category), record, import_interval)
        importer.start()
    app = create_app(
        ReviewStore(record),
        category=category,
        data_dir=data_dir,
        repo_root=repo_root,
        git_push=git_push,
    )
    log.info("review page for %s on http://%s:%d (record %s)", category, host, port, record)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        if importer is not None:
            importer.stop()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fod review: {{category}}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #f6f6f4; color: #222; }
 header { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
 h1 { font-size: 1.3rem; margin: 0 1rem 0 0; }
 .keys { color: #555; font-size: .9rem; }
 #queue { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr));
          gap: 1rem; margin: 1rem 0; }
 .card { background: #fff; border: 2px solid #ddd; border-radius: 8px; padding: .6rem; }
 .card.selected { border-color: #1565c0; box-shadow: 0 0 0 3px #bbdefb; }
 .card img { width: 100%; image-rendering: auto; border-radius: 4px; }
 .meta { font-size: .85rem; margin: .4rem 0; }
 button { font-size: .95rem; padding: .35rem .8rem; margin-right: .3rem; cursor: pointer; }
 .good { background: #e8f5e9; } .defective { background: #ffebee; }
 table { border-collapse: collapse; background: #fff; }
 td, th { border: 1px solid #ccc; padding: .3rem .6rem; font-size: .9rem; }
 #status { min-height: 1.2rem; color: #1565c0; }
</style></head>
<body>
<header>
 <h1>Review: {{category}}</h1>
 <label>Reviewer <input id="reviewer" placeholder="your name" size="16"></label>
 <button id="publish">Publish reviewed images as a new data version</button>
 <span class="keys">Keys: <b>g</b> good, <b>d</b> defective, <b>&larr;/&rarr;</b> move</span>
</header>
<p id="status"></p>
<div id="queue"></div>
<h2 style="font-size:1.1rem">Per model version</h2>
<table id="counts"><thead><tr><th>model</th><th>version</th><th>decisions</th><th>flagged</th>
<th>reviewed</th><th>confirmed defects</th><th>confirmed false alarms</th>
<th>false alarms among reviewed parts</th></tr></thead><tbody></tbody></table>
<script>
let items = [], selected = 0;
const $ = (id) => document.getElementById(id);
const reviewer = $("reviewer");
reviewer.value = sessionStorage.getItem("reviewer") || "";
reviewer.addEventListener("change", () => sessionStorage.setItem("reviewer", reviewer.value));
function say(text) { $("status").textContent = text; }
async function load() {
  items = await (await fetch("api/queue")).json();
  selected = Math.min(selected, Math.max(items.length - 1, 0));
  const queue = $("queue");
  queue.innerHTML = items.length ? "" : "<p>No flagged part is waiting for a verdict.</p>";
  items.forEach((item, index) => {
    const card = document.createElement("div");
    card.className = "card" + (index === selected ? " selected" : "");
    card.dataset.id = item.id;
    card.innerHTML = `<img alt="overlay ${item.id}" src="api/decisions/${item.id}/overlay.png">
      <div class="meta">score <b>${item.score.toFixed(4)}</b> / threshold ${
        item.threshold === null ? "none" : item.threshold.toFixed(4)}<br>
      ${item.model_name} v${item.model_version} &middot; ${new Date(item.time * 1000)
        .toLocaleString()}</div>
      <button class="good" data-verdict="good">Good (g)</button>
      <button class="defective" data-verdict="defective">Defective (d)</button>`;
    card.querySelectorAll("button").forEach((b) =>
      b.addEventListener("click", () => give(item.id, b.dataset.verdict)));
    card.addEventListener("click", () => { selected = index; mark(); });
    queue.appendChild(card);
  });
  const counts = await (await fetch("api/counts")).json();
  $("counts").querySelector("tbody").innerHTML = counts.map((c) => `<tr><td>${c.model_name}</td>
    <td>${c.model_version}</td><td>${c.decisions}</td><td>${c.flagged}</td><td>${c.reviewed}</td>
    <td>${c.confirmed_defects}</td><td>${c.confirmed_false_alarms}</td><td>${
      c.false_alarms_among_reviewed === null ? "-" : c.false_alarms_among_reviewed.toFixed(4)
    }</td></tr>`)
    .join("");
}
function mark() {
  document.querySelectorAll(".card").forEach((c, i) =>
    c.classList.toggle("selected", i === selected));
}
async function give(id, verdict) {
  if (!reviewer.value.trim()) {
    say("Type your name as reviewer first."); reviewer.focus(); return;
  }
  const body = new FormData();
  body.append("verdict", verdict);
  body.append("reviewer", reviewer.value.trim());
  const answer = await fetch(`api/decisions/${id}/verdict`, { method: "POST", body });
  const data = await answer.json();
  say(answer.ok ? `#${id}: ${verdict} (${data.confirms ? "confirms" : "overturns"} the model)`
                : `#${id}: ${data.error}`);
  await load();
}
document.addEventListener("keydown", (event) => {
  if (event.target === reviewer || !items.length) return;
  if (event.key === "g" || event.key === "d") give(items[selected].id,
    event.key === "g" ? "good" : "defective");
  if (event.key === "ArrowRight") { selected = Math.min(selected + 1, items.length - 1); mark(); }
  if (event.key === "ArrowLeft") { selected = Math.max(selected - 1, 0); mark(); }
});
$("publish").addEventListener("click", async () => {
  say("Publishing...");
  const answer = await fetch("api/publish", { method: "POST" });
  const data = await answer.json();
  say(answer.ok ? `Published ${data.good} good and ${data.defective} defective; data version ${
    data.data_version || "unchanged"}` : data.error);
});
load();
</script></body></html>
"""
