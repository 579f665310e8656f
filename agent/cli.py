"""The ``chartsight`` command line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.render import record_as_json, render_record
from agent.settings import Settings, load_settings
from connectors.demo import TOMMY_FRIESEN, import_demo
from connectors.dicomweb import DicomWebClient
from connectors.errors import ChartSightError, FhirImportError
from connectors.fhir_client import FhirClient
from connectors.images import ImageSet, collect_images
from connectors.record import PatientRecord, assemble_record
from connectors.source import FhirSource
from connectors.store import FhirStore, ImportReport, StoreSource

app = typer.Typer(
    help="ChartSight: grounded answers about one patient, from the patient's own FHIR record.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

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

IMPORTABLE = (".json", ".ndjson", ".jsonl", ".json.gz", ".ndjson.gz", ".jsonl.gz")


class _State:
    verbose = False


def _settings(
    config: Path | None, fhir_url: str | None = None, token: str | None = None
) -> Settings:
    settings = load_settings(config)
    if fhir_url:
        settings.fhir.url = fhir_url
    if token:
        settings.fhir.token = SecretStr(token)
    return settings


def _fail(exc: BaseException) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
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


def _import(
    store: FhirStore, files: list[Path], force: bool
) -> tuple[list[ImportReport], list[FhirImportError]]:
    reports, failures = [], []
    with Progress(
        TextColumn("[bold]importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[name]}"),
        console=console,
        transient=True,
    ) as progress:
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
def import_(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Bundle / NDJSON / resource files or folders (.gz accepted)."),
    ],
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option(help="Import files again even if unchanged.")] = False,
) -> None:
    """Import FHIR Bundles, NDJSON (Bulk Data) and resources into the local store."""
    try:
        settings = _settings(config)
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
            f"[red]failed, nothing stored:[/] {failure.reason} ({failure.entry or 'file'})",
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
def patients(
    search: Annotated[str | None, typer.Option("--search", "-s", help="Name starts with.")] = None,
    limit: Annotated[int, typer.Option(help="Most patients listed.")] = 50,
    config: ConfigOpt = None,
) -> None:
    """List the patients in the local store."""
    try:
        settings = _settings(config)
        found = FhirStore(settings.store_url).patients(search, limit=limit)
    except ChartSightError as exc:
        _fail(exc)
    table = Table(title=f"{len(found)} patients" + (f" matching {search!r}" if search else ""))
    for col in ("id", "name", "gender", "born", "resources"):
        table.add_column(col, justify="right" if col == "resources" else "left")
    for p in found:
        table.add_row(p.id, p.name, p.gender or "", p.birth_date or "", str(p.resources))
    console.print(table)


async def _load(
    settings: Settings, patient: str, with_images: bool
) -> tuple[PatientRecord, ImageSet | None]:
    source: FhirSource
    source = (
        FhirClient(settings.fhir)
        if settings.fhir.url
        else StoreSource(FhirStore(settings.store_url))
    )
    dicomweb = DicomWebClient.from_settings(settings.dicomweb)
    try:
        record = await assemble_record(source, patient)
        images = (
            await collect_images(record, source, settings.images, dicomweb) if with_images else None
        )
        return record, images
    finally:
        await source.aclose()
        if dicomweb is not None:
            await dicomweb.aclose()


@app.command()
def record(
    patient: Annotated[str, typer.Argument(help="Patient id, or an identifier value.")],
    fhir_url: FhirUrlOpt = None,
    token: TokenOpt = None,
    dicomweb_url: Annotated[
        str | None, typer.Option("--dicomweb-url", help="DICOMweb root for ImagingStudy pixels.")
    ] = None,
    images: Annotated[bool, typer.Option(help="Fetch and decode the patient's images.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Print a readable summary of a patient's assembled record."""
    try:
        settings = _settings(config, fhir_url, token)
        if dicomweb_url:
            settings.dicomweb.url = dicomweb_url
        rec, imgs = asyncio.run(_load(settings, patient, images))
    except ChartSightError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(record_as_json(rec, imgs)))
    else:
        render_record(console, rec, imgs)


@app.command()
def demo(config: ConfigOpt = None) -> None:
    """Set up the embedded default (demo patients in the local store) and show one patient's record."""
    try:
        settings = _settings(config)
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
        rec, imgs = asyncio.run(_load(settings, TOMMY_FRIESEN, True))
    except ChartSightError as exc:
        _fail(exc)
    render_record(console, rec, imgs)


def main() -> Any:
    """Console-script entry point."""
    return app()


if __name__ == "__main__":
    main()
