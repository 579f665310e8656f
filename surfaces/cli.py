"""The ``chartsight`` command line."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from datetime import time as time_of_day
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from agent import (
    Answer,
    BuildReport,
    Case,
    CaseFilter,
    ChartSections,
    ChartSight,
    ChartSightError,
    ConfigurationError,
    EncoderRegistry,
    FhirImportError,
    ImageSet,
    PatientRecord,
    answer_bundle,
    aware,
    build_index,
    connected,
    display_name,
    install_rebuilt,
    ndjson_source,
    open_index,
)
from connectors.demo import TOMMY_FRIESEN, demo_bundles, import_demo
from connectors.store import FhirStore, ImportReport, StoreSource
from surfaces.render import record_as_json, render_answer, render_record
from surfaces.settings import AppSettings, load_app_settings

# Model loading draws progress bars of its own; the CLI shows its own progress instead.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    help="ChartSight: grounded answers about one patient, from the patient's own FHIR record.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Record text (names, notes, summaries, errors quoting an entry) is printed as text, never read as
# markup: styles are given as Text, not as "[bold]" tags in strings.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)


def _styled(style: str, lead: str, rest: object = "") -> Text:
    """``lead`` in ``style``, then ``rest`` as plain text."""
    return Text.assemble((lead, style), str(rest))


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file.", envvar="CHARTSIGHT_CONFIG"),
]
FhirUrlOpt = Annotated[
    str | None,
    typer.Option("--fhir-url", help="FHIR R4 server base URL (default: the local store)."),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", help="Bearer token for the FHIR server.", envvar="CHARTSIGHT_FHIR__TOKEN"
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model backend: 'evidence' (no model), 'openai', 'transformers', 'llama-cpp', or a "
        "plug-in.",
    ),
]
ModelUrlOpt = Annotated[
    str | None, typer.Option("--model-url", help="Root of an OpenAI-compatible API (…/v1).")
]
ModelNameOpt = Annotated[str | None, typer.Option("--model-name", help="Model name to request.")]
PatientArg = Annotated[str, typer.Argument(help="Patient id, or an identifier value.")]
QuestionArg = Annotated[str, typer.Argument(help="The clinician's question.")]
ThreadOpt = Annotated[
    str | None,
    typer.Option(
        help="Continue (or start) this conversation thread: questions and answers are kept for "
        "follow-ups. Without it nothing is kept."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
AnswerJsonOpt = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]


def _asked_on(value: datetime | None) -> datetime | None:
    """``--now`` as the agent takes it (a naive time is read as UTC; a day alone is the end of
    that day, so that results taken during it count as on it); a day after today is refused
    (typer's usage error, exit 2): no question is asked in the future."""
    if value is None:
        return None
    moment = aware(value)
    if moment.date() > datetime.now(UTC).date():
        raise typer.BadParameter(f"{moment.date().isoformat()} is after today")
    if moment.time() == time_of_day.min:  # "--now 2026-11-29": all of that day
        moment = min(moment + timedelta(days=1, microseconds=-1), datetime.now(UTC))
    return moment


NowOpt = Annotated[
    datetime | None,
    typer.Option(
        "--now",
        formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"],
        callback=_asked_on,
        help="The day the question is asked on (ISO 8601, UTC; default today): the chart is read "
        "as of the end of that day (what is dated later is not taken as latest, active or done), "
        "and 'last year', 'recent' and ages count back from it. For a chart exported in the past "
        "(the demo patients end in 2020), give the day it was exported.",
    ),
]

# The options every command that reads a patient, or also answers, shares (see ``_configured``).
_SOURCE_OPTIONS: tuple[tuple[str, Any], ...] = (("fhir_url", FhirUrlOpt), ("token", TokenOpt))
_MODEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("model", ModelOpt),
    ("model_url", ModelUrlOpt),
    ("model_name", ModelNameOpt),
)

IMPORTABLE = (".json", ".ndjson", ".jsonl", ".json.gz", ".ndjson.gz", ".jsonl.gz")


class _State:
    verbose = False


def _settings(
    config: Path | None,
    fhir_url: str | None = None,
    token: str | None = None,
    model: str | None = None,
    model_url: str | None = None,
    model_name: str | None = None,
) -> AppSettings:
    """The settings of ``config`` (else the default file and the environment) with the given
    command-line options applied; ``--model-url`` alone means the ``openai`` backend."""
    settings = load_app_settings(config)
    if fhir_url:
        settings.fhir.url = fhir_url
    if token:
        settings.fhir.token = SecretStr(token)
    if model:
        settings.model.name = model
    if model_url:
        settings.model.base_url = model_url
        if not model:
            settings.model.name = "openai"
    if model_name:
        settings.model.model = model_name
    return settings


Command = Callable[..., None]


def _configured(*, source: bool = False, model: bool = False) -> Callable[[Command], Command]:
    """Decorator for a command that takes ``settings: AppSettings``: on the command line that
    parameter becomes the shared options, in its place (``--fhir-url``/``--token`` with
    ``source``, then ``--model``/``--model-url``/``--model-name`` with ``model``), and
    ``--config`` comes last. The command is called with the settings built from them (the TOML
    file and ``CHARTSIGHT_`` environment, then the options); a settings error is the one-line
    ``error:`` and exit status 1 before the command runs."""
    shared = [*(_SOURCE_OPTIONS if source else ()), *(_MODEL_OPTIONS if model else ())]

    def decorate(command: Command) -> Command:
        hints = get_type_hints(command, include_extras=True)
        params: list[inspect.Parameter] = []
        for param in inspect.signature(command).parameters.values():
            if param.name == "settings":
                params += [
                    inspect.Parameter(name, param.kind, default=None, annotation=hint)
                    for name, hint in shared
                ]
            else:
                params.append(param.replace(annotation=hints[param.name]))
        params.append(
            inspect.Parameter(
                "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt
            )
        )

        @functools.wraps(command)
        def configured(**options: Any) -> None:
            given = {name: options.pop(name) for name, _ in [*shared, ("config", ConfigOpt)]}
            try:
                settings = _settings(**given)
            except ChartSightError as exc:
                _fail(exc)
            command(settings=settings, **options)

        # Typer reads a command's options from its signature and annotations.
        configured.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        configured.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return configured

    return decorate


def _reader(
    settings: AppSettings,
    *,
    dense: bool = False,
    use_index: bool = False,
    now: datetime | None = None,
) -> ChartSight:
    """ChartSight opened for reading patients only: no model backend, no thread checkpointer
    (and, unless asked for, neither the text encoder nor the similar-case index)."""
    return ChartSight(settings, answering=False, dense=dense, use_index=use_index, now=now)


def _fail(exc: BaseException) -> None:
    err_console.print(_styled("bold red", "error: ", exc), highlight=False)
    if _State.verbose:
        err_console.print_exception()
    raise typer.Exit(1)


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress and show tracebacks.")
    ] = False,
) -> None:
    _State.verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() and p.name.endswith(IMPORTABLE)
            )
        else:
            yield path


def _progress(doing: str, detail: str) -> Progress:
    """A transient progress bar on the console: ``doing`` in bold, the bar, done/total, the time
    elapsed, then the task's field ``detail`` (set with ``progress.update(task, detail=...)``)."""
    return Progress(
        TextColumn(f"[bold]{doing}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn(f"{{task.fields[{detail}]}}"),
        console=console,
        transient=True,
    )


def _import(
    store: FhirStore, files: list[Path], force: bool
) -> tuple[list[ImportReport], list[FhirImportError]]:
    reports, failures = [], []
    with _progress("importing", "name") as progress:
        task = progress.add_task("import", total=len(files), name="")
        for path in files:
            progress.update(task, name=path.name)
            try:
                reports.append(store.import_path(path, force=force))
            except FhirImportError as exc:
                failures.append(exc)
            progress.advance(task)
    return reports, failures


@app.command("import")
@_configured()
def import_(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Bundle / NDJSON / resource files or folders (.gz accepted)."),
    ],
    settings: AppSettings,
    force: Annotated[bool, typer.Option(help="Import files again even if unchanged.")] = False,
) -> None:
    """Import FHIR Bundles, NDJSON (Bulk Data) and resources into the local store."""
    try:
        store = FhirStore(settings.store_url, batch_size=settings.store.batch_size)
    except ChartSightError as exc:
        _fail(exc)
    files = list(_files(paths))
    if not files:
        _fail(
            FhirImportError(" ".join(map(str, paths)), "no importable files (.json, .ndjson, .gz)")
        )
    reports, failures = _import(store, files, force)
    table = Table(title=f"Imported into {store.engine.url.render_as_string(hide_password=True)}")
    table.add_column("file")
    table.add_column("resources", justify="right")
    table.add_column("result")
    for rep in reports:
        status = "unchanged, skipped" if rep.unchanged else "imported"
        if rep.skipped:
            status += f" ({len(rep.skipped)} entries skipped: {rep.skipped[0]}…)"
        table.add_row(Path(rep.path).name, str(rep.count), status)
    for failure in failures:
        table.add_row(
            Path(failure.path).name,
            "0",
            _styled(
                "red", "failed, nothing stored: ", f"{failure.reason} ({failure.entry or 'file'})"
            ),
        )
    console.print(table)
    total = sum(r.count for r in reports)
    by_type: dict[str, int] = {}
    for rep in reports:
        for rtype, n in rep.imported.items():
            by_type[rtype] = by_type.get(rtype, 0) + n
    console.print(
        f"{total} resources from {sum(1 for r in reports if not r.unchanged)} files"
        f"; {sum(1 for r in reports if r.unchanged)} unchanged files skipped; {len(failures)} files failed."
    )
    if by_type:
        console.print(", ".join(f"{t} {n}" for t, n in sorted(by_type.items())), style="dim")
    if failures:
        raise typer.Exit(1)


@app.command()
@_configured()
def bulk(
    fhir_url: Annotated[str, typer.Argument(help="FHIR R4 server base URL offering $export.")],
    settings: AppSettings,
    group: Annotated[
        str | None, typer.Option("--group", help="Export this Group's patients (Group/ID/$export).")
    ] = None,
    patients: Annotated[
        bool, typer.Option("--patients", help="Export every patient's data (Patient/$export).")
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only resources changed since this date or FHIR instant (_since). Default: the "
            "transactionTime of the last complete run of the same export, if any.",
        ),
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option("--type", help="Resource types to export (_type); repeat or comma-separate."),
    ] = None,
    output_format: Annotated[
        str, typer.Option("--output-format", help="_outputFormat asked of the server.")
    ] = "application/fhir+ndjson",
    full: Annotated[
        bool, typer.Option("--full", help="Export everything, ignoring the last run's time.")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Cancel an unfinished run and kick off anew.")
    ] = False,
    cancel: Annotated[
        bool, typer.Option("--cancel", help="Cancel the unfinished run (DELETE) and stop.")
    ] = False,
    token: TokenOpt = None,
) -> None:
    """Import a FHIR Bulk Data export ($export) into the local store; a killed run resumes, and a
    later run imports only what changed."""
    from connectors.bulk import BulkExport, BulkProgress, ExportRequest, parse_since

    settings.fhir.url = fhir_url
    if token:
        settings.fhir.token = SecretStr(token)
    try:
        if group and patients:
            raise ConfigurationError("--group and --patients name different exports: pick one")
        request = ExportRequest(
            level="group" if group else "patient" if patients else "system",
            group=group,
            types=tuple(t for value in types or [] for t in value.split(",") if t),
            output_format=output_format,
        )
        since_instant = parse_since(since) if since else None
        store = FhirStore(settings.store_url, batch_size=settings.store.batch_size)
    except ChartSightError as exc:
        _fail(exc)
    exporter = BulkExport(settings.fhir, settings.bulk, store, settings.bulk_state_dir)

    async def run() -> Any:
        async with exporter:
            if cancel:
                return await exporter.cancel(request)
            with Progress(
                TextColumn("[bold]bulk"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[detail]}"),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task("bulk", total=None, detail="")

                def show(event: BulkProgress) -> None:
                    # event.detail is server text (X-Progress, a manifest's type): escaped, so
                    # that "[/bold]" is shown, not read as Rich markup
                    if event.phase in ("kick-off", "waiting"):
                        detail = f"{event.phase} {escape(event.detail)}".strip()
                        bar.update(task, detail=detail)
                        return
                    bar.update(
                        task,
                        completed=event.files_done,
                        total=event.files_total or None,
                        detail=f"files; {event.bytes / 2**20:.1f} MiB, {event.resources} "
                        f"resources {escape(event.detail)}",
                    )

                return await exporter.run(
                    request, since=since_instant, full=full, restart=restart, progress=show
                )

    try:
        outcome = asyncio.run(run())
    except ChartSightError as exc:
        _fail(exc)
    finally:
        store.close()
    if cancel:
        console.print(
            f"cancelled {escape(outcome)}" if outcome else "no unfinished export to cancel"
        )
        return
    report = outcome
    console.print(
        f"{report.count} resources from {report.files} files into {store.safe_url()}"
        f"{' (resumed)' if report.resumed else ''}; _since "
        f"{report.since or 'none (everything)'}; transactionTime {report.transaction_time}"
        f"; {report.unchanged} files unchanged."
    )
    if report.imported:
        console.print(
            ", ".join(f"{t} {n}" for t, n in sorted(report.imported.items())), style="dim"
        )
    for line in report.skipped[:20]:
        err_console.print(_styled("yellow", "skipped: ", line), highlight=False)
    for line in report.server_errors[:20]:
        err_console.print(_styled("yellow", "server error file: ", line), highlight=False)
    if len(report.server_errors) > 20:
        err_console.print(f"... {len(report.server_errors) - 20} more error lines", style="yellow")
    for failure in report.failed:
        err_console.print(_styled("red", "failed, nothing stored: ", failure), highlight=False)
    if report.failed:
        err_console.print("run the same command again to retry the failed files")
        raise typer.Exit(1)


@app.command()
@_configured()
def patients(
    search: Annotated[str | None, typer.Option("--search", "-s", help="Name starts with.")] = None,
    limit: Annotated[int, typer.Option(help="Most patients listed.")] = 50,
    *,
    settings: AppSettings,
) -> None:
    """List the patients in the local store."""
    try:
        found = FhirStore(settings.store_url).patients(search, limit=limit)
    except ChartSightError as exc:
        _fail(exc)
    table = Table(
        title=f"{len(found)} patients" + (f" matching {search!r}" if search else ""),
        box=None,  # borders would push a full id and name past 80 columns
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("id", "name", "gender", "born", "resources"):
        # an id is copied, never cut: the other columns give way in a narrow terminal
        table.add_column(
            col,
            justify="right" if col == "resources" else "left",
            no_wrap=True,
            min_width=(
                len(max((p.id for p in found), key=len, default=""))
                if col == "id"
                else 10
                if col == "born"
                else None
            ),
            overflow="ellipsis",
        )
    for p in found:
        table.add_row(p.id, p.name, p.gender or "", p.birth_date or "", str(p.resources))
    console.print(table)


@app.command()
@_configured(source=True)
def find(
    name: Annotated[str, typer.Argument(help="Given and family name, e.g. 'Tommy Friesen'.")],
    born: Annotated[str | None, typer.Option(help="Birth date, YYYY-MM-DD.")] = None,
    *,
    settings: AppSettings,
) -> None:
    """Find a patient's id by name and birth date ('Patient not found' when there is none)."""
    try:

        async def run() -> list[Any]:
            async with _reader(settings) as agent:
                return await agent.find_patients(name, born)

        found = asyncio.run(run())
    except ChartSightError as exc:
        _fail(exc)
    if not found:
        console.print("Patient not found")
        raise typer.Exit(1)
    for patient in found:
        console.print(
            f"{patient.id}  {display_name(patient)}  born {patient.birthDate}", highlight=False
        )


async def _load(
    settings: AppSettings, patient: str, with_images: bool
) -> tuple[PatientRecord, ImageSet | None, ChartSections]:
    async with _reader(settings) as agent:
        record = await agent.record(patient)
        images = await agent.images(record) if with_images else None
        return record, images, agent.sections(record)


@app.command()
@_configured(source=True)
def record(
    patient: PatientArg,
    settings: AppSettings,
    dicomweb_url: Annotated[
        str | None, typer.Option("--dicomweb-url", help="DICOMweb root for ImagingStudy pixels.")
    ] = None,
    images: Annotated[bool, typer.Option(help="Fetch and decode the patient's images.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Print a readable summary of a patient's assembled record."""
    try:
        if dicomweb_url:
            settings.dicomweb.url = dicomweb_url
        rec, imgs, sections = asyncio.run(_load(settings, patient, images))
    except ChartSightError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(record_as_json(rec, imgs)))
    else:
        render_record(console, rec, imgs, sections)


@app.command()
@_configured()
def demo(settings: AppSettings) -> None:
    """Set up the embedded default (demo patients in the local store, the case index) and answer a
    few questions about one patient, every sentence cited and verified."""
    try:
        store = FhirStore(settings.store_url)
        reports = import_demo(store)
    except ChartSightError as exc:
        _fail(exc)
    new = sum(r.count for r in reports if not r.unchanged)
    console.print(
        f"Local store {store.engine.url.render_as_string(hide_password=True)}: "
        f"{len(store.patients())} patients ({new} resources imported now)."
    )
    try:
        rec, imgs, sections = asyncio.run(_load(settings, TOMMY_FRIESEN, True))
    except ChartSightError as exc:
        _fail(exc)
    render_record(console, rec, imgs, sections)

    try:
        encoders = EncoderRegistry(settings.retrieval.encoders)
        index = open_index(settings, encoders)

        async def build() -> BuildReport:
            return await build_index(index, StoreSource(store), settings)

        report = asyncio.run(build())
        console.print(
            f"Similar-case index: {len(index)} cases ({report.added} added now) in "
            f"{settings.index_path}."
        )

        async def answers() -> list[Answer]:
            async with ChartSight(settings, encoders=encoders) as agent:
                return [await agent.ask(TOMMY_FRIESEN, q) for q in DEMO_QUESTIONS]

        for question, answer in zip(DEMO_QUESTIONS, asyncio.run(answers()), strict=True):
            console.rule(Text(question, style="bold"))
            render_answer(console, answer)
    except ChartSightError as exc:
        _fail(exc)


DEMO_QUESTIONS = (
    "What was his last hemoglobin A1c?",
    "What medications is he currently taking?",
    "Are there similar patients?",
)


index_app = typer.Typer(help="The similar-case index.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
@_configured(source=True)
def index_build(
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="'local' (the local store) or 'fhir' (the FHIR server of --fhir-url or the "
            "settings). Default: the FHIR server when one is given, else the local store.",
        ),
    ] = None,
    *,
    settings: AppSettings,
    rebuild: Annotated[
        bool, typer.Option(help="Start from an empty index (after changing encoders).")
    ] = False,
    engine: Annotated[
        str | None,
        typer.Option(
            help="'local' (this process; the default) or 'ray' (batches built and encoded on "
            "Ray actors; needs the 'ray' extra)."
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="With --engine ray: the Ray cluster (ray://head:10001, or 'auto'); default: a "
            "Ray instance on this machine for the build."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --engine ray: Ray actors (default: one per GPU, else per CPU)."
        ),
    ] = None,
    ndjson: Annotated[
        list[Path] | None,
        typer.Option(
            "--ndjson",
            help="Build from a FHIR Bulk Data export's NDJSON files (a file or folder; may be "
            "repeated) instead of the store or a FHIR server (--fhir-url is then not read for "
            "the build): a full export, read into a temporary store that is removed after it.",
        ),
    ] = None,
) -> None:
    """Add every patient of the source to the similar-case index (only new or changed ones are
    encoded), here or on Ray (--engine ray): the same index either way."""
    try:
        if source not in (None, "local", "fhir"):
            raise ConfigurationError(f"--source is 'local' or 'fhir', not {source!r}")
        if ndjson and source is not None:
            raise ConfigurationError("--ndjson is the source; leave out --source")
        build = settings.index_build
        if engine not in (None, "local", "ray"):
            raise ConfigurationError(f"--engine is 'local' or 'ray', not {engine!r}")
        if engine is not None:
            build.engine = "ray" if engine == "ray" else "local"
        if (address or workers) and build.engine != "ray":
            raise ConfigurationError("--address and --workers are options of --engine ray")
        build.address = address or build.address
        build.workers = workers or build.workers
        if source == "local":
            settings.fhir.url = None
        elif source == "fhir" and not settings.fhir.url:
            raise ConfigurationError("--source fhir needs --fhir-url (or fhir.url in settings)")
        encoders = EncoderRegistry(settings.retrieval.encoders)
        try:
            index = open_index(settings, encoders, rebuild=rebuild)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot open the index folder {settings.index_path}: {exc.strerror or exc}"
            ) from exc
    except ChartSightError as exc:
        _fail(exc)
    started = time.perf_counter()

    async def run(using: AppSettings) -> BuildReport:
        async with connected(using) as (src, dicomweb):
            return await _build(using, src, dicomweb)

    async def _build(using: AppSettings, src: Any, dicomweb: Any) -> BuildReport:
        with _progress("indexing", "rate") as progress:
            task = progress.add_task("index", total=None, rate="")

            def advance(done: int, total: int, cases: int) -> None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress.update(
                    task, completed=done, total=total, rate=f"{done / elapsed:.1f} patients/s"
                )

            return await build_index(index, src, using, dicomweb, progress=advance)

    def from_ndjson(paths: list[Path]) -> BuildReport:
        with _progress("reading NDJSON", "name") as progress:
            task = progress.add_task("ndjson", total=None, name="")

            def reading(done: int, total: int, path: Path) -> None:
                progress.update(task, completed=done, total=total, name=path.name)

            with ndjson_source(paths, settings, reading) as using:
                progress.update(task, visible=False)
                return asyncio.run(run(using))

    try:
        report = from_ndjson(ndjson) if ndjson else asyncio.run(run(settings))
        if rebuild and not report.cases:
            # an empty source (a failed export, the wrong server) never replaces a live index
            raise ConfigurationError(
                f"the source gave no cases ({report.patients} patients): the rebuilt index was "
                f"not installed, and the index at {settings.index_path} is kept"
            )
        if rebuild:
            install_rebuilt(index, settings)
            index = open_index(settings, encoders)
    except ChartSightError as exc:
        _fail(exc)
    elapsed = time.perf_counter() - started
    console.print(
        f"{report.patients} patients, {report.cases} cases in {elapsed:.1f} s "
        f"({report.patients / max(elapsed, 1e-9):.1f} patients/s"
        f"{f' on Ray, {report.workers} workers' if report.engine == 'ray' else ''}): "
        f"{report.added} added, "
        f"{report.updated} updated, {report.unchanged} unchanged; {len(index)} cases in "
        f"{settings.index_path} ({index.factory}, {index.fusion.dim}-d, "
        f"{index.text_encoder.info.name} + {index.image_encoder.info.name})."
    )
    for pid, error in report.failed:
        err_console.print(_styled("yellow", f"skipped Patient/{pid}: ", error), highlight=False)


@app.command()
@_configured(source=True)
def similar(
    patient: PatientArg,
    k: Annotated[int, typer.Option("--k", "-k", help="How many similar cases.")] = 5,
    modality: Annotated[str | None, typer.Option(help="Only cases with this modality.")] = None,
    sex: Annotated[str | None, typer.Option(help="Only cases of this sex.")] = None,
    age_band: Annotated[str | None, typer.Option(help="Only this age band, e.g. 70-79.")] = None,
    *,
    settings: AppSettings,
    as_json: JsonOpt = False,
) -> None:
    """Cases most similar to the patient's (the patient's own cases left out)."""
    try:
        flt = CaseFilter(modality=modality, sex=sex, age_band=age_band)

        async def run() -> tuple[Case, list[Any], int]:
            async with _reader(settings, dense=True, use_index=True) as agent:
                hits = await agent.similar(patient, k, flt)
                return await agent.patient_case(patient), hits, agent.cases_indexed

        case, hits, indexed = asyncio.run(run())
    except ChartSightError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps([asdict(h) for h in hits]))
        return
    console.print(_styled("bold", case.key, f": {case.summary}"), highlight=False)
    if not hits:
        console.print(
            f"No similar cases in the index ({indexed} cases; run `chartsight index build`)."
        )
        return
    table = Table(title=f"{len(hits)} most similar of {indexed} cases")
    for col in ("score", "case", "summary"):
        table.add_column(col, overflow="fold")
    for hit in hits:
        table.add_row(f"{hit.score:.3f}", hit.key, hit.summary)
    console.print(table)


@app.command()
@_configured(source=True)
def evidence(
    patient: PatientArg,
    question: QuestionArg,
    budget: Annotated[
        int | None, typer.Option(help="Token budget (default from settings).")
    ] = None,
    dense: Annotated[bool, typer.Option(help="Use the text encoder as well as BM25.")] = True,
    *,
    settings: AppSettings,
    as_json: JsonOpt = False,
    now: NowOpt = None,
) -> None:
    """The ranked chart evidence the agent would see for a question."""
    try:

        async def run() -> list[Any]:
            async with _reader(settings, dense=dense, now=now) as agent:
                return await agent.evidence(patient, question, budget)

        ranked = asyncio.run(run())
    except ChartSightError as exc:
        _fail(exc)
    if as_json:
        console.print_json(
            json.dumps(
                [
                    {
                        "id": r.evidence.id,
                        "text": r.evidence.text,
                        "date": r.evidence.date.isoformat() if r.evidence.date else None,
                        "category": r.evidence.category,
                        "codes": list(r.evidence.codes),
                        "score": round(r.score, 4),
                        "parts": {k: round(v, 4) for k, v in r.parts.items()},
                    }
                    for r in ranked
                ]
            )
        )
        return
    table = Table(
        title=f"Evidence for {question!r} ({sum(r.tokens for r in ranked)} tokens)",
        title_justify="left",
    )
    table.add_column("score", justify="right")
    table.add_column("evidence", overflow="fold")
    for r in ranked:
        table.add_row(f"{r.score:.2f}", r.evidence.text)
    console.print(table)


SUITES_DIR = Path(__file__).resolve().parents[1] / "agent" / "suites"


@app.command("eval")
@_configured(source=True, model=True)
def eval_(
    suites: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Suite files (JSON Lines, see the README); default: the shipped demo suite.",
            show_default=False,
        ),
    ] = None,
    bundles: Annotated[
        list[Path] | None,
        typer.Option(
            "--bundles",
            help="FHIR files or folders to evaluate on, imported into a throwaway store "
            "(default for the shipped demo suite: the demo patients; otherwise the configured "
            "source is used).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Folder for report.md, report.html and results.jsonl.")
    ] = Path("chartsight-eval"),
    family: Annotated[list[str] | None, typer.Option(help="Only these question families.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N questions.", min=1)] = None,
    fail_under: Annotated[
        float | None,
        typer.Option(
            help="Exit with status 1 when the right-or-rightly-abstained share (percent) is lower."
        ),
    ] = None,
    *,
    settings: AppSettings,
) -> None:
    """Run a question suite with expected answers and score ChartSight on it: value, citations,
    abstention and latency per family, written as a Markdown report, an HTML page with plots and
    the results of every question."""
    import tempfile

    from agent.evaluation import EvalError, load_suite, run_suite, suite_now
    from surfaces.eval_report import overall, prepare_out, write_report

    paths = suites or [SUITES_DIR / "demo.jsonl"]
    given_bundles = bool(bundles)
    if not suites and not bundles and not settings.fhir.url:
        bundles = list(demo_bundles())
    try:
        items = load_suite(paths)
    except EvalError as exc:
        _fail(exc)
    if family:
        items = [i for i in items if i.family in set(family)]
    items = items[:limit] if limit else items
    if not items:
        _fail(EvalError("no questions to run (check --family)"))
    try:
        prepare_out(out)  # before the run: an --out that cannot be written fails at once
    except EvalError as exc:
        _fail(exc)
    with tempfile.TemporaryDirectory(prefix="chartsight-eval-") as tmp:
        if bundles:
            settings = settings.model_copy(deep=True)
            settings.home = Path(tmp)
            settings.store.url = f"sqlite:///{Path(tmp) / 'store.db'}"
            store = FhirStore(settings.store_url)
            _, failures = _import(store, list(_files(bundles)), force=False)
            for failure in failures:
                err_console.print(_styled("yellow", "not imported: ", failure), highlight=False)
        try:
            now = suite_now(items)

            async def run() -> list[Any]:
                async with ChartSight(settings, now=now, use_index=False) as agent:
                    with _progress("asking", "question") as progress:
                        task = progress.add_task("eval", total=len(items), question="")

                        def advance(done: int, total: int) -> None:
                            progress.update(task, completed=done, question=items[done - 1].id)

                        return await run_suite(agent, items, advance)

            results = asyncio.run(run())
        except ChartSightError as exc:
            _fail(exc)
    where = (
        "the demo patients"
        if bundles and not given_bundles
        else "the bundles given"
        if bundles
        else "the configured source"
    )
    setup = (
        f"Suites: {', '.join(p.name for p in paths)}; {len(items)} questions on {where}; "
        f"model backend {settings.model.name}; now = {now.date() if now else 'today'}. The first "
        "question of each patient includes fetching and embedding the record (cold)."
    )
    try:
        written = write_report(
            results, out, title="ChartSight evaluation", setup=setup, model=settings.model.name
        )
    except EvalError as exc:
        _fail(exc)
    t = overall(results)
    table = Table(
        title=f"{t['right']:.0f}/{t['items']:.0f} right or rightly abstained ({t['rate']:.1%})",
        title_justify="left",
    )
    for col in ("family", "items", "right", "wrong", "abstained", "p50 ms"):
        table.add_column(col, justify="left" if col == "family" else "right")
    from surfaces.eval_report import summarise

    for f in summarise(results):
        table.add_row(
            f.family,
            str(f.items),
            f"{f.right / f.items:.1%}",
            str(f.wrong),
            str(f.abstained),
            f"{f.p50_ms:.0f}",
        )
    console.print(table)
    console.print(
        f"Report: {written['markdown']}, {written['html']}; every answer: {written['results']}"
    )
    if fail_under is not None and 100 * t["rate"] < fail_under:
        raise typer.Exit(1)


def _print_answer(answer: Answer, as_json: bool) -> None:
    if as_json:
        console.print_json(answer.model_dump_json())
    else:
        render_answer(console, answer)


@app.command()
@_configured(source=True, model=True)
def ask(
    patient: PatientArg,
    question: QuestionArg,
    settings: AppSettings,
    thread: ThreadOpt = None,
    stream: Annotated[
        bool, typer.Option(help="Show the stages and the model's draft as they happen.")
    ] = False,
    as_json: AnswerJsonOpt = False,
    as_fhir: Annotated[
        bool,
        typer.Option(
            "--fhir",
            help="Print the answer as a FHIR R4 Bundle: a DocumentReference and its AI "
            "Provenance (HL7 AI Transparency on FHIR).",
        ),
    ] = False,
    now: NowOpt = None,
) -> None:
    """Answer a question about one patient, every sentence cited and checked against the record."""

    def show(kind: str, data: dict[str, Any]) -> None:
        if kind == "token":
            err_console.print(data["text"], end="", style="dim", highlight=False)
        elif kind == "node_finished":
            err_console.print(Text(f"· {data['node']} {data['ms']:.0f} ms", style="dim"))

    try:

        async def run() -> Answer:
            async with ChartSight(settings, now=now) as agent:
                return await agent.ask(
                    patient,
                    question,
                    thread_id=thread,
                    on_event=show if stream else None,
                    keep=False,  # without --thread nothing is kept, as in the HTTP API
                )

        answer = asyncio.run(run())
    except ChartSightError as exc:
        _fail(exc)
    if as_fhir:
        public = settings.serve.public_url
        card = f"{public.rstrip('/')}/model-card" if public else None
        typer.echo(json.dumps(answer_bundle(answer, model_card_url=card), indent=2))
        return
    _print_answer(answer, as_json)


@app.command()
@_configured(source=True, model=True)
def resume(
    thread: Annotated[str, typer.Argument(help="The thread whose interrupted run to finish.")],
    settings: AppSettings,
    show_only: Annotated[
        bool, typer.Option("--show", help="Only show what is pending; run nothing.")
    ] = False,
    as_json: AnswerJsonOpt = False,
) -> None:
    """Inspect or finish a question whose run was interrupted (a crash, a stopped process)."""
    try:

        async def run() -> tuple[dict[str, Any] | None, Answer | None]:
            async with ChartSight(settings) as agent:
                waiting = await agent.pending(thread)
                if waiting is None or show_only:
                    return waiting, None
                return waiting, await agent.resume(thread)

        waiting, answer = asyncio.run(run())
    except ChartSightError as exc:
        _fail(exc)
    if waiting is None:
        console.print(f"Thread {thread} has no interrupted run.", highlight=False)
        return
    if answer is None:
        console.print(
            f"Interrupted: {waiting['question']!r} (patient {waiting['patient_id']}); done: "
            f"{', '.join(waiting['completed']) or 'nothing'}; next: {', '.join(waiting['next'])}",
            highlight=False,
        )
        return
    _print_answer(answer, as_json)


@app.command()
@_configured(source=True, model=True)
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes (uvicorn), each with its own agent and caches, sharing the "
            "store, the audit log and the CDS and draft databases. Above 1 needs the SMART app "
            "page off (serve.smart.issuers empty).",
        ),
    ] = 1,
    *,
    settings: AppSettings,
) -> None:
    """The HTTP service: /v1/ask (+ SSE), similar cases, CDS Hooks, MCP at /mcp/; docs at /docs."""
    import uvicorn

    from surfaces.http.app import SETTINGS_FILE_ENV, create_app
    from surfaces.http.middleware import request_log_to_stderr

    s = settings.serve
    if workers > 1 and s.smart.issuers:
        _fail(
            ConfigurationError(
                "--workers above 1 needs the SMART app page off (serve.smart.issuers empty): its "
                "launches and sessions live in one process's memory, and an EHR's callback or a "
                "clinician's next request could reach another worker"
            )
        )
    if s.auth.anonymous and (host or s.host) not in ("127.0.0.1", "localhost", "::1"):
        _fail(ConfigurationError("serve.auth.anonymous is for a loopback address only"))
    if not (s.auth.api_keys or s.auth.issuer or s.auth.anonymous):
        err_console.print(
            "warning: no credentials are configured, so every request will be refused (401): "
            "add a key (`chartsight api-key`) under [[serve.auth.api_keys]], or serve.auth.issuer "
            "and jwks_url for SMART tokens",
            highlight=False,
        )
    # the request log (one bare JSON line per request, no PHI) is the service's own output, at
    # INFO whatever -v says; -v adds everything else's progress
    request_log_to_stderr()
    options: dict[str, Any] = {
        "host": host or s.host,
        "port": port or s.port,
        "access_log": False,  # its lines carry patient ids in paths; the app logs route templates
        "log_level": "info",
    }
    if workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    import pickle
    import tempfile

    _create_databases(settings)  # once, before the workers open them at the same moment
    with tempfile.TemporaryDirectory(prefix="chartsight-serve-") as folder:  # mode 0700
        path = Path(folder) / "settings.pickle"
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            # the fields, validated already (the settings' class is made per TOML file and
            # cannot be pickled by name)
            pickle.dump(dict(settings), fh)
        os.environ[SETTINGS_FILE_ENV] = str(path)  # read by each worker (and any restarted one)
        uvicorn.run(
            "surfaces.http.app:app_from_environment",
            factory=True,
            workers=workers,
            # a worker importing the model stack holds the GIL for seconds on a busy machine, and
            # uvicorn's default 5 s without an answer to its ping killed every worker at start
            timeout_worker_healthcheck=60,
            **options,
        )


def _create_databases(settings: AppSettings) -> None:
    """Create the service's tables and triggers (audit log, drafts, CDS store; the local FHIR
    store when no FHIR server is configured) in this process, so that ``--workers`` processes
    starting together find them made instead of racing to ``CREATE TABLE``."""
    from surfaces.http.deps import Service

    for database in Service.databases(settings):
        database.close()
    if not settings.fhir.url:
        FhirStore(settings.store_url).close()


@app.command("model-card")
@_configured(model=True)
def model_card_command(
    settings: AppSettings,
    as_json: Annotated[bool, typer.Option("--json", help="The card as JSON.")] = False,
) -> None:
    """ChartSight's model card (ONC HTI-1 decision support source attributes), for the model
    configured: the same card as the service's /model-card."""
    from surfaces.model_card import card_text, model_card

    card = model_card(settings)
    if as_json:
        print(json.dumps(card, indent=2, ensure_ascii=False))
    else:
        console.print(card_text(card), highlight=False, markup=False)


@app.command("mcp")
@_configured(source=True, model=True)
def mcp_stdio(settings: AppSettings) -> None:
    """ChartSight's tools over MCP on stdin/stdout (for a local agent or copilot)."""
    from surfaces.mcp import run_stdio

    run_stdio(lambda: ChartSight(settings))


@app.command("api-key")
def api_key(
    client_id: Annotated[str, typer.Argument(help="The service account's name.")],
    scopes: Annotated[str, typer.Option(help="SMART scopes granted.")] = "system/*.read",
    patient: Annotated[
        str | None,
        typer.Option(help="Bind the key to this patient (with patient/... scopes)."),
    ] = None,
) -> None:
    """Make an API key: prints the key (give it to the client) and the settings entry (keep that)."""
    import json
    import secrets

    from surfaces.http.security import Principal, key_digest, may, patient_levels

    holder = Principal("x", "x", frozenset(scopes.split()))
    levels = patient_levels(holder)
    # an auditor's key reads the audit trail (user/AuditEvent.rs), no record
    auditor = may(holder, "AuditEvent", "rs", levels={"user", "system"}, wildcard=False)
    if not levels and not auditor:
        _fail(
            ConfigurationError(
                f"the scopes {scopes!r} let the key read neither a record (Patient.rs or *.rs) "
                "nor the audit trail (user/AuditEvent.rs)"
            )
        )
    if levels == {"patient"} and not patient:
        _fail(ConfigurationError("patient/... scopes need --patient (the patient the key is for)"))
    key = f"cs_{secrets.token_urlsafe(32)}"
    console.print(f"key (shown once): {key}", highlight=False)
    lines = [
        "[[serve.auth.api_keys]]",
        f"client_id = {json.dumps(client_id)}",  # a JSON string is a valid TOML basic string
        f"key_sha256 = {json.dumps(key_digest(key))}",
        f"scopes = {json.dumps(scopes)}",
    ]
    if patient:
        lines.append(f"patient = {json.dumps(patient)}")
    entry = "\n".join(lines)
    console.print(f"settings entry (chartsight.toml):\n{entry}", highlight=False)


@app.command()
@_configured(source=True, model=True)
def chat(patient: PatientArg, settings: AppSettings, thread: ThreadOpt = None) -> None:
    """Questions and follow-ups about one patient in one thread (an empty line ends it)."""

    async def run() -> None:
        async with ChartSight(settings) as agent:
            current = thread
            while True:
                question = await asyncio.to_thread(console.input, Text("question> ", style="bold"))
                if not question.strip():
                    return
                try:
                    answer = await agent.ask(patient, question, thread_id=current)
                except ChartSightError as exc:
                    err_console.print(_styled("bold red", "error: ", exc), highlight=False)
                    continue
                current = answer.thread_id
                render_answer(console, answer)

    try:
        asyncio.run(run())
    except (EOFError, KeyboardInterrupt):
        return
    except ChartSightError as exc:
        _fail(exc)


def main() -> Any:
    """Console-script entry point."""
    return app()


if __name__ == "__main__":
    main()
