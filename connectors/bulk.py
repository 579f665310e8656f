"""A FHIR Bulk Data Access client: ``$export`` into the local store, resumable.

HL7 FHIR Bulk Data Access IG v2.0.0 (https://hl7.org/fhir/uv/bulkdata/STU2/export.html): a
kick-off request (``[base]/$export``, ``[base]/Patient/$export`` or ``[base]/Group/[id]/$export``
with ``Accept: application/fhir+json`` and ``Prefer: respond-async``, parameters ``_type``,
``_since`` and ``_outputFormat``) answered by 202 and a ``Content-Location`` status URL; status
requests answered by 202 (``X-Progress``, ``Retry-After``) until a 200 carries the manifest
(``transactionTime``, ``requiresAccessToken``, ``output``, ``deleted``, ``error``); the files are
NDJSON, fetched with the access token only when ``requiresAccessToken`` is true; ``DELETE`` on the
status URL cancels an export.

``BulkExport.run`` keeps its progress in a small JSON state file per server and kick-off
parameters (``ExportRequest.key``): the status URL as soon as the kick-off is answered, the
manifest, and each file's state (pending, downloaded, imported, failed). A run that was killed
continues where it stopped: it polls the same status URL, skips imported files, imports downloaded
ones and continues partial downloads with an HTTP ``Range`` request where the server allows it.
Each output file is streamed to disk and imported by the store's importer (``FhirStore.import_path``:
the same validation, all or nothing per file, the same skipped-entry warnings), never held in memory.
When every file is in, the manifest's ``transactionTime`` is kept, and the next run without an
explicit ``_since`` asks only for what changed after it (the IG's advice for incremental exports).

What the server sends is not trusted: the status URL must be on the FHIR server's origin; file
URLs, and each hop of a file's redirects (at most ``MAX_REDIRECTS``), on that origin or a host of
``bulk.file_hosts``; a file is refused over ``bulk.max_file_bytes`` (downloaded or decompressed) or
with more than ``MAX_BLANK_LINES`` blank lines; a manifest ``type`` must be a resource type name
before a local file name is built from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from connectors.auth import fhir_auth
from connectors.errors import ConnectorError, FhirImportError, HttpStatusError, ResourceNotFound
from connectors.http import RetryingHttp, _detail, retry_after_seconds
from connectors.resources import is_resource_type
from connectors.settings import BulkSettings, FhirServerSettings
from connectors.store import FhirStore, ImportReport
from connectors.store.parsing import loads

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
Level = Literal["system", "patient", "group"]
FileKind = Literal["output", "deleted", "error"]
# Answers of a status URL or an output file that mean the export is gone (expired or deleted).
GONE = frozenset({404, 410})
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 16
# Redirects followed for one file download (each hop checked like a manifest URL); RFC 9110
# section 15.4 sets no number, httpx's own default is 20, browsers stop near 20: 5 is plenty for
# a FHIR server handing a file to object storage.
MAX_REDIRECTS = 5
# Blank lines accepted in one export file. NDJSON (ndjson-spec 1.0.0; IG v2.0.0 "Bulk Data Output
# File Format") holds one resource per line; a blank line carries nothing, a trailing newline or a
# few padding lines are harmless, a file of millions of them is a decompression bomb.
MAX_BLANK_LINES = 1000
# A FHIR resource type name (FHIR R4 "Resource" names: an upper-case letter, then letters): the
# only server text a local file name is built from.
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_FILE_NAME = re.compile(r"\d{5}-(output|deleted|error)-[A-Za-z]{1,64}")


class BulkError(ConnectorError):
    """A Bulk Data export could not be started, followed or downloaded; the message says what the
    server answered and what to do (resume, ``--restart``, ``--cancel``)."""


def parse_since(value: str) -> str:
    """``_since`` as a FHIR instant: ``2024-05-01`` becomes ``2024-05-01T00:00:00Z``; an instant
    with a time zone (``2024-05-01T10:00:00+02:00``, ``...Z``) is kept as given. Raises
    ``BulkError`` for anything else (the IG requires an instant, with a time zone)."""
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BulkError(f"--since {value!r} is not a date or FHIR instant") from exc
    if "T" not in text:
        return f"{parsed.date().isoformat()}T00:00:00Z"
    if parsed.tzinfo is None:
        raise BulkError(f"--since {value!r} needs a time zone (e.g. Z or +01:00)")
    return text


@dataclass(frozen=True)
class ExportRequest:
    """What is exported: ``level`` ``system`` (``[base]/$export``), ``patient``
    (``[base]/Patient/$export``) or ``group`` (``[base]/Group/{group}/$export``); ``types``: the
    ``_type`` resource types (all when empty); ``output_format``: ``_outputFormat``."""

    level: Level = "system"
    group: str | None = None
    types: tuple[str, ...] = ()
    output_format: str = NDJSON

    def __post_init__(self) -> None:
        if (self.level == "group") != bool(self.group):
            raise BulkError("a group-level export needs a Group id, and only it takes one")
        unknown = [t for t in self.types if not is_resource_type(t)]
        if unknown:
            raise BulkError(f"--type {', '.join(unknown)}: not a FHIR R4 resource type")

    def path(self) -> str:
        """The kick-off path under the FHIR base URL: ``$export``, ``Patient/$export`` or
        ``Group/{id}/$export``."""
        return {"system": "$export", "patient": "Patient/$export"}.get(
            self.level, f"Group/{self.group}/$export"
        )

    def params(self, since: str | None) -> list[tuple[str, str]]:
        """The kick-off query: ``_outputFormat``, ``_type`` (comma-separated) and ``_since``."""
        out = [("_outputFormat", self.output_format)]
        if self.types:
            out.append(("_type", ",".join(self.types)))
        if since:
            out.append(("_since", since))
        return out

    def key(self, base_url: str) -> str:
        """16 hex digits naming this export of ``base_url`` (``_since`` left out: a later run with
        another ``_since`` continues the same series): the state file's name."""
        ident = [
            base_url.rstrip("/"),
            self.level,
            self.group,
            sorted(self.types),
            self.output_format,
        ]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


@dataclass
class BulkReport:
    """What one run did. ``transaction_time``: the manifest's; ``since``: the ``_since`` asked
    (``None``: everything); ``resumed``: a killed or failed run was continued (no new kick-off);
    ``imported``: resources stored per type (``"{type} (deleted)"`` for deletions);
    ``files``: output files imported; ``unchanged``: files the store had imported before;
    ``skipped``: entries the importer left out, as ``file: line ...``; ``server_errors``: the
    lines of the manifest's error files (OperationOutcome issues: ``severity code: text``);
    ``failed``: ``FhirImportError``/``BulkError`` per file that did not go in."""

    transaction_time: str | None = None
    since: str | None = None
    resumed: bool = False
    imported: Counter[str] = field(default_factory=Counter)
    files: int = 0
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    failed: list[ConnectorError] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Resources stored (and deleted) by this run."""
        return sum(self.imported.values())


@dataclass(frozen=True)
class BulkProgress:
    """One progress event: ``phase`` ``kick-off``, ``waiting`` (``detail``: the server's
    ``X-Progress``), ``downloading`` or ``done``; ``files_done``/``files_total`` (output,
    deleted and error files); ``bytes``: bytes downloaded so far in this run; ``resources``:
    resources imported so far."""

    phase: str
    detail: str = ""
    files_done: int = 0
    files_total: int = 0
    bytes: int = 0
    resources: int = 0


ProgressFn = Callable[[BulkProgress], None]


class ExportState:
    """The JSON state of one export series (``ExportRequest.key``) under ``folder``: the last
    complete run's ``transactionTime`` and the ``job`` in progress (``status_url``, ``since``,
    ``manifest``, ``files``: url → ``{kind, type, name, state, error}``). Written atomically
    (a temporary file renamed over the old one), so a kill leaves the old or the new state."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        self.path = folder / f"{key}.json"
        self.files_dir = folder / key
        self.data: dict[str, Any] = {"last_transaction_time": None, "job": None}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise BulkError(f"{self.path} is damaged ({exc}); delete it to start over") from exc

    @property
    def job(self) -> dict[str, Any] | None:
        """The export in progress, or ``None``."""
        job = self.data.get("job")
        return job if isinstance(job, dict) else None

    def save(self) -> None:
        """Write the state file (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def clear_job(self) -> None:
        """Forget the export in progress and delete its downloaded files."""
        self.data["job"] = None
        self.save()
        shutil.rmtree(self.files_dir, ignore_errors=True)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _scan_file(path: Path, limit: int) -> None:
    """Refuse a downloaded export file (plain or gzip) whose content, decompressed, is longer than
    ``limit`` bytes or has more than ``MAX_BLANK_LINES`` blank lines, reading it in 64 KiB chunks
    (the whole file is never held). Raises ``BulkError`` naming the file and the limit;
    ``OSError``/``EOFError``/``gzip.BadGzipFile`` are left to the importer, which reports them."""
    with path.open("rb") as raw:
        gz = raw.read(2) == _GZIP_MAGIC
    size = blank = 0
    line_empty = True  # the line being read has only whitespace so far
    opener = gzip.open if gz else open
    with contextlib.suppress(OSError, EOFError), opener(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise BulkError(
                    f"{path.name}: more than {limit} bytes{' once decompressed' if gz else ''}, "
                    "the limit bulk.max_file_bytes; not imported"
                )
            *ended, rest = chunk.split(b"\n")
            for piece in ended:
                blank += line_empty and not piece.strip()
                line_empty = True
            line_empty = line_empty and not rest.strip()
            if blank > MAX_BLANK_LINES:
                raise BulkError(
                    f"{path.name}: more than {MAX_BLANK_LINES} blank lines (NDJSON holds one "
                    "resource per line); not imported"
                )


def _outcome_lines(outcome: Any) -> list[str]:
    """``severity code: text`` per issue of an OperationOutcome (else one line saying what the
    line held)."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        kind = outcome.get("resourceType") if isinstance(outcome, dict) else type(outcome).__name__
        return [f"(not an OperationOutcome: {kind})"]
    lines = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        lines.append(f"{issue.get('severity', '?')} {issue.get('code', '?')}: {text}".strip())
    return lines or ["(an OperationOutcome without issues)"]


class BulkExport:
    """Runs exports of one FHIR server into ``store``. ``fhir``: the server's settings (URL,
    bearer token or SMART Backend Services, HTTP timeouts and retries); ``bulk``: polling,
    concurrency; ``state_dir``: where exports in progress are kept. Use as ``async with``."""

    def __init__(
        self,
        fhir: FhirServerSettings,
        bulk: BulkSettings,
        store: FhirStore,
        state_dir: Path,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not fhir.url:
            raise BulkError("no FHIR server URL given")
        scheme = urlsplit(fhir.url).scheme
        if scheme not in ("http", "https"):
            raise BulkError(f"{fhir.url}: the FHIR base URL must be http or https")
        self.base_url = fhir.url.rstrip("/")
        self.fhir = fhir
        self.bulk = bulk
        self.store = store
        self.state_dir = state_dir
        # The kick-off, status and token-bearing downloads go through the FHIR server's client.
        self.http = RetryingHttp(
            fhir.http,
            auth=fhir_auth(fhir, self.base_url),
            headers={"Accept": "application/fhir+json"},
            transport=transport,
        )
        # Files that need no token may live on a host of bulk.file_hosts (object storage):
        # fetched without credentials and without following redirects.
        self.plain = httpx.AsyncClient(
            timeout=httpx.Timeout(fhir.http.timeout_s),
            verify=fhir.http.verify_tls,
            follow_redirects=False,
            transport=transport,
        )
        self._import_lock = asyncio.Lock()

    async def __aenter__(self) -> BulkExport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close both HTTP clients."""
        await self.http.aclose()
        await self.plain.aclose()

    def state(self, request: ExportRequest) -> ExportState:
        """The state file of ``request``'s export series on this server."""
        return ExportState(self.state_dir, request.key(self.base_url))

    def _check_status_url(self, url: str) -> None:
        """Raise ``BulkError`` unless ``url`` is on the FHIR server's origin (scheme, host and
        port, RFC 6454): the status URL gets the access token, and a ``Content-Location`` (or a
        state file) naming another address (``http://169.254.169.254/...``) must not."""
        if _origin(url) != _origin(self.base_url):
            theirs, ours = ("{}://{}:{}".format(*_origin(u)) for u in (url, self.base_url))
            raise BulkError(
                f"the export's status URL {url!r:.200} is on {theirs}, not on the FHIR server's "
                f"origin {ours}: refused, nothing was sent there (the export stays unfinished "
                "on the server)"
            )

    def _file_url_problem(self, url: str, with_token: bool) -> str | None:
        """Why an export file may not be fetched from ``url`` (``None``: it may): not http(s),
        or on a host other than the FHIR server's origin that ``bulk.file_hosts`` does not list.
        The same rule for a manifest's URLs and each redirect hop of a download."""
        if urlsplit(url).scheme not in ("http", "https"):
            return f"{url!r:.200} is not an http(s) URL"
        host = urlsplit(url).hostname or ""
        if _origin(url) == _origin(self.base_url) or host in self.bulk.file_hosts:
            return None
        # A manifest is the server's word: without this check a server (or whoever can write
        # its manifests) could make ChartSight fetch, with the token when requiresAccessToken is
        # set, any address it can reach.
        return (
            f"{url} is not on the FHIR server ({self.base_url}); add {host!r} to "
            "bulk.file_hosts to download export files from it"
            + (" (the access token is sent there)" if with_token else "")
        )

    def _sends_token(self, url: str, with_token: bool) -> bool:
        """Whether a file request to ``url`` carries the access token: only when the manifest
        sets ``requiresAccessToken`` and ``url`` is on the FHIR server's origin or a host
        ``bulk.file_hosts`` lists."""
        return with_token and self._file_url_problem(url, with_token) is None

    # ---------------------------------------------------------------- cancel

    async def cancel(self, request: ExportRequest) -> str | None:
        """Cancel the export in progress: ``DELETE`` its status URL (IG v2.0.0, "Delete a Bulk
        Data Request"), forget it and its files. Returns the status URL cancelled, ``None`` when
        there was none. A 404/410 (the server forgot it already) is not an error; other error
        answers, and a status URL off the FHIR server's origin (nothing is sent there), raise
        ``BulkError`` after the local state is cleared."""
        state = self.state(request)
        job = state.job
        if job is None:
            return None
        url = str(job["status_url"])
        state.clear_job()
        self._check_status_url(url)
        try:
            await self.http.request("DELETE", url, follow_redirects=False)
        except ResourceNotFound:
            pass
        except HttpStatusError as exc:
            if exc.status not in GONE:
                raise BulkError(f"the server refused to cancel the export: {exc}") from exc
        return url

    # ---------------------------------------------------------------- run

    async def run(
        self,
        request: ExportRequest,
        *,
        since: str | None = None,
        full: bool = False,
        restart: bool = False,
        progress: ProgressFn | None = None,
    ) -> BulkReport:
        """Export ``request`` into the store, continuing an interrupted run of the same export.

        ``_since`` is ``since`` when given, else (unless ``full``) the ``transactionTime`` of the
        last complete run, else none. An unfinished run asking the same ``_since`` is continued
        (no new kick-off); ``restart`` cancels it first. Returns a ``BulkReport``; files that
        could not be imported are in ``report.failed`` and keep the run unfinished (the next run
        retries them; the ``transactionTime`` is kept only when every file went in). Raises
        ``BulkError`` (kick-off refused, export failed or expired, not complete within
        ``bulk.max_wait_s``), ``ConnectorError`` for transport and authorization failures."""
        notify = progress or (lambda _event: None)
        state = self.state(request)
        if since is None and not full:
            since = state.data.get("last_transaction_time")
        job = state.job
        if job is not None and (restart or job.get("since") != since):
            log.info("cancelling the unfinished export %s", job.get("status_url"))
            await self.cancel(request)
            job = None
        report = BulkReport(since=since, resumed=job is not None)
        if job is None:
            job = await self._kick_off(request, since, state, notify)
        if job.get("manifest") is None:
            try:
                job["manifest"] = await self._wait(str(job["status_url"]), notify)
            except _Gone as exc:
                if not report.resumed:
                    raise BulkError(f"the export vanished while it ran: {exc}") from exc
                log.info("the interrupted export is gone (%s); kicking off again", exc)
                state.clear_job()
                report.resumed = False
                job = await self._kick_off(request, since, state, notify)
                job["manifest"] = await self._wait(str(job["status_url"]), notify)
            job["files"], job["refused"] = self._plan(job["manifest"])
            state.save()
        elif any(not _FILE_NAME.fullmatch(str(f.get("name"))) for f in job["files"].values()):
            # a state file written before file names were checked: plan its files again
            job["files"], job["refused"] = self._plan(job["manifest"])
            state.save()
        manifest = job["manifest"]
        report.server_errors += job.get("refused") or []
        report.transaction_time = str(manifest.get("transactionTime") or "") or None
        await self._fetch_all(job, state, manifest, report, notify)
        if not report.failed:
            state.data["last_transaction_time"] = report.transaction_time
            state.clear_job()
        notify(BulkProgress("done", files_done=len(job["files"]), files_total=len(job["files"])))
        return report

    async def _kick_off(
        self, request: ExportRequest, since: str | None, state: ExportState, notify: ProgressFn
    ) -> dict[str, Any]:
        notify(BulkProgress("kick-off", request.path()))
        url = f"{self.base_url}/{request.path()}"
        try:
            response = await self.http.request(
                "GET",
                url,
                params=request.params(since),
                headers={"Accept": "application/fhir+json", "Prefer": "respond-async"},
            )
        except HttpStatusError as exc:
            raise BulkError(f"the server refused the $export kick-off: {exc}") from exc
        location = response.headers.get("Content-Location")
        if response.status_code != 202 or not location:
            raise BulkError(
                f"{url} answered HTTP {response.status_code}"
                f"{'' if location else ' without a Content-Location'}: not an asynchronous "
                "$export (FHIR Bulk Data Access)"
            )
        status_url = str(response.url.join(location))
        self._check_status_url(status_url)
        job: dict[str, Any] = {
            "status_url": status_url,
            "since": since,
            "kicked_off": time.time(),
            "manifest": None,
            "files": {},
        }
        state.data["job"] = job
        state.save()
        shutil.rmtree(state.files_dir, ignore_errors=True)
        return job

    async def _wait(self, status_url: str, notify: ProgressFn) -> dict[str, Any]:
        """Poll ``status_url`` until the manifest comes (200), waiting ``Retry-After`` (capped
        at ``poll_max_s``) or, without one, ``poll_initial_s`` doubling up to ``poll_max_s``.
        Raises ``BulkError`` before any request when ``status_url`` is off the FHIR server's
        origin; redirects are not followed (a 3xx is an error: the token stays on the origin)."""
        self._check_status_url(status_url)
        deadline = time.monotonic() + self.bulk.max_wait_s
        delay = self.bulk.poll_initial_s
        while True:
            try:
                response = await self.http.request("GET", status_url, follow_redirects=False)
            except HttpStatusError as exc:
                if exc.status in GONE:
                    raise _Gone(str(exc)) from exc
                raise BulkError(f"the export failed: {exc}") from exc
            if response.status_code == 200:
                return self._manifest(response, status_url)
            if response.status_code != 202:
                raise BulkError(
                    f"{status_url} answered HTTP {response.status_code}, neither 202 (in "
                    "progress) nor 200 (complete)"
                )
            notify(BulkProgress("waiting", response.headers.get("X-Progress", "")[:100]))
            after = retry_after_seconds(response.headers.get("Retry-After"))
            wait = min(after if after is not None else delay, self.bulk.poll_max_s)
            delay = min(delay * 2, self.bulk.poll_max_s)
            if time.monotonic() + wait > deadline:
                raise BulkError(
                    f"the export was not complete after {self.bulk.max_wait_s:g} s; run the "
                    "same command again to keep waiting, or --cancel it"
                )
            await asyncio.sleep(wait)

    def _manifest(self, response: httpx.Response, status_url: str) -> dict[str, Any]:
        try:
            manifest = response.json()
        except ValueError as exc:
            raise BulkError(f"{status_url}: the complete status is not JSON") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
            raise BulkError(f"{status_url}: the complete status has no output array")
        return manifest

    def _plan(self, manifest: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """``(url → file entry, refused)`` for the items of ``output``, ``deleted`` and
        ``error``. An item whose ``type`` is given but not a FHIR resource type name
        (``^[A-Z][A-Za-z]{1,63}$``: ``a/../../x``, a NUL) is left out and described in
        ``refused`` (reported like an error file's lines); local file names are built only from
        checked types. Raises ``BulkError`` for an item without an http(s) URL, or on a host
        other than the FHIR server's (scheme, host and port) that ``bulk.file_hosts`` does not
        list."""
        with_token = bool(manifest.get("requiresAccessToken"))
        files: dict[str, dict[str, Any]] = {}
        refused: list[str] = []
        kinds: tuple[FileKind, ...] = ("output", "deleted", "error")
        for kind in kinds:
            items = manifest.get(kind) or []
            if not isinstance(items, list):
                raise BulkError(f"the manifest's {kind} is not an array")
            for item in items:
                url = item.get("url") if isinstance(item, dict) else None
                if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
                    raise BulkError(f"the manifest's {kind} names no http(s) url: {item!r:.200}")
                if problem := self._file_url_problem(url, with_token):
                    raise BulkError(problem)
                rtype = str(item.get("type") or "")
                if rtype and not _RESOURCE_TYPE.fullmatch(rtype):
                    refused.append(
                        f"manifest {kind} entry {url!r:.200} refused: type {rtype!r:.80} is not a "
                        "FHIR resource type name"
                    )
                    continue
                files[url] = {
                    "kind": kind,
                    "type": rtype,
                    "name": f"{len(files):05d}-{kind}-{rtype or 'file'}",
                    "state": "pending",
                    "error": None,
                }
        return files, refused

    # ---------------------------------------------------------------- files

    async def _fetch_all(
        self,
        job: dict[str, Any],
        state: ExportState,
        manifest: dict[str, Any],
        report: BulkReport,
        notify: ProgressFn,
    ) -> None:
        files: dict[str, dict[str, Any]] = job["files"]
        with_token = bool(manifest.get("requiresAccessToken"))
        limit = asyncio.Semaphore(self.bulk.concurrency)
        counters = {"bytes": 0, "done": sum(f["state"] == "imported" for f in files.values())}
        state.files_dir.mkdir(parents=True, exist_ok=True)

        def tick(detail: str = "") -> None:
            notify(
                BulkProgress(
                    "downloading",
                    detail,
                    counters["done"],
                    len(files),
                    counters["bytes"],
                    report.count,
                )
            )

        async def one(url: str, entry: dict[str, Any]) -> None:
            try:
                if entry["state"] in ("pending", "failed") and not _downloaded(state, entry):
                    async with limit:
                        await self._download(url, entry, state, with_token, counters, tick)
                entry["state"] = "downloaded"
                state.save()
                async with self._import_lock:
                    await self._take(url, entry, state, report)
                entry["state"], entry["error"] = "imported", None
                if (done := _downloaded(state, entry)) is not None:
                    done.unlink()
            except ConnectorError as exc:
                entry["state"], entry["error"] = "failed", str(exc)
                report.failed.append(exc)
            state.save()
            counters["done"] += 1
            tick(entry["type"])

        tick()
        await asyncio.gather(*(one(url, e) for url, e in files.items() if e["state"] != "imported"))

    async def _download(
        self,
        url: str,
        entry: dict[str, Any],
        state: ExportState,
        with_token: bool,
        counters: dict[str, int],
        tick: Callable[[str], None],
    ) -> None:
        """Stream ``url`` to ``<name>.part`` and rename it ``<name>.ndjson`` (``.ndjson.gz`` when
        the bytes are gzip: a ``Content-Encoding: gzip`` answer is kept compressed). A partial
        file of an uncompressed answer continues with ``Range: bytes={size}-``; a server that
        answers 200 instead of 206 sends it again from the start. Transport errors, 429 and
        5xx are retried (``Retry-After`` honoured) up to ``fhir.http.max_retries`` times.
        Redirects are followed by ``_open_file`` (at most ``MAX_REDIRECTS``, each hop checked).
        Raises ``BulkError`` for a file over ``bulk.max_file_bytes`` (by ``Content-Length``, or
        once that many bytes came; the partial file is deleted)."""
        part = state.files_dir / f"{entry['name']}.part"
        settings = self.fhir.http
        attempt = 0
        while True:
            offset = part.stat().st_size if part.exists() and entry.get("identity") else 0
            headers = {"Accept": NDJSON}
            if offset:
                headers.update({"Range": f"bytes={offset}-", "Accept-Encoding": "identity"})
            retry_after: float | None = None
            try:
                async with self._open_file(url, headers, with_token) as response:
                    if response.status_code in GONE:
                        raise BulkError(
                            f"{url} answered HTTP {response.status_code}: the export's files "
                            "expired; run again with --restart"
                        )
                    if response.status_code in (429, 500, 502, 503, 504):
                        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                        await response.aread()
                        raise _Retry(f"HTTP {response.status_code}")
                    if response.status_code not in (200, 206):
                        await response.aread()
                        raise HttpStatusError(url, response.status_code, _detail(response))
                    gzipped = response.headers.get("Content-Encoding", "").lower() == "gzip"
                    resumed = response.status_code == 206 and offset > 0
                    if resumed and _range_start(response) != offset:
                        part.unlink()  # an answer for other bytes: start the file again
                        raise _Retry(f"a 206 answer that does not start at byte {offset}")
                    start = offset if resumed else 0
                    limit = self.bulk.max_file_bytes
                    length = response.headers.get("Content-Length", "")
                    if length.isdigit() and start + int(length) > limit:
                        part.unlink(missing_ok=True)
                        raise BulkError(_too_big(url, limit, f"Content-Length {length}"))
                    entry["identity"] = not gzipped
                    state.save()
                    chunks = response.aiter_raw(_CHUNK) if gzipped else response.aiter_bytes(_CHUNK)
                    with part.open("ab" if resumed else "wb") as out:
                        async for chunk in chunks:
                            start += len(chunk)
                            if start > limit:
                                out.close()
                                part.unlink()
                                raise BulkError(_too_big(url, limit, "the bytes sent"))
                            out.write(chunk)
                            counters["bytes"] += len(chunk)
                            tick(entry["type"])
                break
            except (_Retry, httpx.TransportError) as exc:
                if attempt >= settings.max_retries:
                    raise BulkError(f"{url}: {exc} after {attempt + 1} attempts") from exc
                wait = min(
                    retry_after
                    if retry_after is not None
                    else settings.backoff_base_s * 2**attempt,
                    settings.backoff_max_s,
                )
                log.info("download of %s interrupted (%s); again in %.1f s", url, exc, wait)
                attempt += 1
                await asyncio.sleep(wait)
        with part.open("rb") as fh:
            gz = fh.read(2) == _GZIP_MAGIC
        part.rename(state.files_dir / f"{entry['name']}.ndjson{'.gz' if gz else ''}")

    @contextlib.asynccontextmanager
    async def _open_file(
        self, url: str, headers: dict[str, str], with_token: bool
    ) -> AsyncIterator[httpx.Response]:
        """The streamed answer to ``GET url``, redirects followed by hand: at most
        ``MAX_REDIRECTS`` hops, each ``Location`` checked by ``_file_url_problem`` (the rule for
        the manifest's URLs) before it is requested, the token sent only where
        ``_sends_token`` allows. Raises ``BulkError`` for a refused hop or too many."""
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            client = self.http.client if self._sends_token(target, with_token) else self.plain
            async with client.stream(
                "GET", target, headers=headers, follow_redirects=False
            ) as response:
                if not response.is_redirect:
                    yield response
                    return
                await response.aread()
                hop = str(response.url.join(response.headers["Location"]))
            if problem := self._file_url_problem(hop, with_token):
                raise BulkError(f"{target} redirected to a refused address: {problem}")
            target = hop
        raise BulkError(f"{url}: more than {MAX_REDIRECTS} redirects; not downloaded")

    async def _take(
        self, url: str, entry: dict[str, Any], state: ExportState, report: BulkReport
    ) -> None:
        """Import (output), apply (deleted) or read (error) the downloaded file of ``entry``,
        after ``_scan_file`` (decompressed size and blank lines) let it through: a refused file
        raises ``BulkError`` and nothing of it is stored."""
        path = _downloaded(state, entry)
        if path is None:
            raise BulkError(f"{url}: the downloaded file is missing from {state.files_dir}")
        await asyncio.to_thread(_scan_file, path, self.bulk.max_file_bytes)
        if entry["kind"] == "error":
            report.server_errors += await asyncio.to_thread(self._errors, path)
            return
        if entry["kind"] == "deleted":
            imported = await asyncio.to_thread(self._deletions, path, url)
        else:
            imported = await asyncio.to_thread(self.store.import_path, path)
            report.files += 1
        report.unchanged += imported.unchanged
        report.imported.update(imported.imported)
        report.skipped += [f"{url}: {s}" for s in imported.skipped]

    def _errors(self, path: Path) -> list[str]:
        from connectors.store.files import read_lines

        lines: list[str] = []
        for lineno, text in read_lines(path, self.store.max_line_bytes):
            if text.strip():
                lines += _outcome_lines(loads(text, str(path), f"line {lineno}"))
        return lines

    def _deletions(self, path: Path, url: str) -> ImportReport:
        """The ``deleted`` file's transaction Bundles (one per line, entries ``request.method``
        ``DELETE``, IG v2.0.0) applied as one transaction: all of the file or nothing."""
        from connectors.store.files import read_lines

        entries: list[Any] = []
        for lineno, text in read_lines(path, self.store.max_line_bytes):
            if not text.strip():
                continue
            bundle = loads(text, url, f"line {lineno}")
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise FhirImportError(
                    url, "a deleted-resources line is not a Bundle", f"line {lineno}"
                )
            for entry in bundle.get("entry") or []:
                request = entry.get("request") if isinstance(entry, dict) else None
                if not isinstance(request, dict) or request.get("method") != "DELETE":
                    raise FhirImportError(
                        url, "a deleted-resources entry is not a DELETE request", f"line {lineno}"
                    )
                target = str(request.get("url") or "")
                if target.startswith(("http://", "https://")):  # absolute: [base]/Type/id
                    target = "/".join(target.rstrip("/").split("/")[-2:])
                entries.append({"request": {"method": "DELETE", "url": target}})
        return self.store.import_json(
            {"resourceType": "Bundle", "type": "transaction", "entry": entries}, url
        )


class _Gone(Exception):
    """The status URL answered 404 or 410."""


class _Retry(Exception):
    """A download answer worth asking again (429, 5xx)."""


def _too_big(url: str, limit: int, by: str) -> str:
    """The message for a file over ``bulk.max_file_bytes``."""
    return f"{url}: larger than {limit} bytes ({by}), the limit bulk.max_file_bytes; not downloaded"


def _range_start(response: httpx.Response) -> int | None:
    """The first byte position of a 206 answer's ``Content-Range: bytes a-b/n``."""
    value = response.headers.get("Content-Range", "")
    with contextlib.suppress(ValueError):
        return int(value.removeprefix("bytes ").split("-", 1)[0])
    return None


def _downloaded(state: ExportState, entry: dict[str, Any]) -> Path | None:
    """The completely downloaded file of ``entry`` (``.ndjson`` or ``.ndjson.gz``), if any."""
    for suffix in (".ndjson", ".ndjson.gz"):
        path = state.files_dir / f"{entry['name']}{suffix}"
        if path.is_file():
            return path
    return None
