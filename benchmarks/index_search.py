"""Case-index search: build time, memory, queries/s and recall@10 against exact search.

For each size (10k, 100k, 1M vectors) and dimension (512 = CLIP-style, 1280 = EfficientNet-Lite0),
side by side in one run:
  - exact        FAISS IndexFlatIP (what ChartSight uses below 50k cases)
  - numpy        plain matrix product + argpartition (what a hand-rolled store does)
  - ChartSight   the index kind ``auto_factory`` picks for that size, at the nprobe it is given
Vectors are synthetic but clustered like real embeddings (a Gaussian mixture on the unit sphere);
queries come from the same mixture. Runs on the GPU too when FAISS sees one (``--gpu``).
Results are appended to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from retrieval.index import auto_factory  # noqa: E402


def mixture(
    n: int, d: int, centers: np.ndarray, rng: np.random.Generator, spread: float = 1.0
) -> np.ndarray:
    """Unit vectors around random centres (spread like embeddings of many similar cases)."""
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        which = rng.integers(0, len(centers), m)
        x = centers[which] + rng.standard_normal((m, d), dtype=np.float32) * (spread / np.sqrt(d))
        out[start : start + m] = x
    faiss.normalize_L2(out)
    return out


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def qps(search, queries: np.ndarray, single: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(queries/s one at a time, queries/s in one batch)."""
    start = time.perf_counter()
    for q in queries[:single]:
        search(q[None, :])
    one = single / (time.perf_counter() - start)
    start = time.perf_counter()
    search(queries)
    batch = len(queries) / (time.perf_counter() - start)
    return one, batch


def recall(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(
        np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)])
    )


def run(n: int, d: int, nq: int, nprobes: list[int], gpu: bool) -> list[str]:
    rng = np.random.default_rng(n + d)
    # two levels, like embeddings: broad groups (a modality, a body region) of finer clusters (a
    # finding); a case sits at cosine ≈ 0.55 from its cluster's centre
    groups = rng.standard_normal((100, d), dtype=np.float32)
    faiss.normalize_L2(groups)
    centers = mixture(max(100, n // 50), d, groups, rng)
    xb = mixture(n, d, centers, rng, spread=1.5)
    xq = mixture(nq, d, centers, rng, spread=1.5)
    single = 50 if n >= 1_000_000 else 200
    rows = []

    # exact
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(xb)
    build = time.perf_counter() - start
    _, truth = flat.search(xq, 10)
    one, batch = qps(lambda q, ix=flat: ix.search(q, 10), xq, single)
    exact_batch = batch
    rows.append(("exact (FAISS Flat)", build, n * d * 4, one, batch, 1.0))
    del flat
    gc.collect()

    # numpy
    def np_search(q: np.ndarray, xb: np.ndarray = xb) -> np.ndarray:
        scores = q @ xb.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
        return np.take_along_axis(top, order, 1)

    one, batch = qps(np_search, xq[: min(nq, 256)], min(single, 50))
    found = np_search(xq[:256])
    rows.append(("numpy brute force", 0.0, n * d * 4, one, batch, recall(found, truth[:256])))

    # ChartSight's automatic choice
    factory = auto_factory(n, d, memory_budget_mb=16_384)
    start = time.perf_counter()
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.niter = 10
        sample = xb[rng.choice(n, min(n, 64 * ivf.nlist), replace=False)]  # as CaseIndex does
        index.train(sample)
    index.add(xb)
    build = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".faiss") as tmp:  # serialising in memory doubles RSS
        faiss.write_index(index, tmp.name)
        size = Path(tmp.name).stat().st_size
    for nprobe in nprobes if ivf is not None else [0]:
        if ivf is not None:
            ivf.nprobe = nprobe
        _, found = index.search(xq, 10)
        one, batch = qps(lambda q, ix=index: ix.search(q, 10), xq, single)
        label = f"ChartSight auto: {factory}" + (f", nprobe {nprobe}" if ivf is not None else "")
        rows.append((label, build, size, one, batch, recall(found, truth)))

    if gpu and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        for name, cpu_index in (("GPU exact", faiss.IndexFlatIP(d)), ("GPU " + factory, index)):
            start = time.perf_counter()
            if name == "GPU exact":
                cpu_index.add(xb)
            g = faiss.index_cpu_to_gpu(res, 0, cpu_index)
            if ivf is not None and name != "GPU exact":
                faiss.GpuParameterSpace().set_index_parameter(g, "nprobe", nprobes[0])
            build = time.perf_counter() - start
            _, found = g.search(xq, 10)
            one, batch = qps(lambda q, ix=g: ix.search(q, 10), xq, single)
            rows.append((name, build, size, one, batch, recall(found, truth)))
    out = []
    for label, build, size, one, batch, rec in rows:
        out.append(
            f"| {n:,} | {d} | {label} | {build:.1f} s | {size / 2**20:.0f} MiB | {one:,.0f} | "
            f"{batch:,.0f} | {batch / exact_batch:.1f}× | {rec:.3f} |"
        )
    print("\n".join(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 1280])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--gpu", action="store_true", help="Also time FAISS on the GPU.")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    lines = []
    for n in args.sizes:
        for d in args.dims:
            lines += run(n, d, args.queries, args.nprobe, args.gpu)
    report = (
        f"\n## Case-index search — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {describe()}; FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads. "
        f"{args.queries} queries, k = 10; synthetic clustered unit vectors. Single = one query per "
        "call; batch = all queries in one call. Recall@10 against exact search. Peak RSS "
        f"{rss_gb():.1f} GiB.\n\n"
        "| vectors | d | index | build | size | q/s single | q/s batch | × exact (batch) | recall@10 |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    print(report)
    if not args.results.exists():
        args.results.write_text("# ChartSight benchmark results\n")
    with args.results.open("a") as fh:
        fh.write(report)


if __name__ == "__main__":
    main()
