#!/usr/bin/env python3
"""One benchmark workload against any Milvus-protocol endpoint, through pymilvus's MilvusClient.

The same script runs against Vectorflow (`vectorflow serve`, uri `http://127.0.0.1:PORT`) and
against milvus-lite (uri = a local `*.db` path; pymilvus starts the embedded server), so the two
can be compared in one session:

    PY=/opt/vectorflow-milvus/venv/bin/python
    $PY examples/pymilvus/bench.py --uri /tmp/bench-lite/milvus.db --label milvus-lite --json lite.json
    $PY examples/pymilvus/bench.py --uri http://127.0.0.1:19530 --label vectorflow --json vf.json

Workload (every step goes through MilvusClient, every call has a timeout):
  1. create_collection with an explicit schema (INT64 primary `id`, FLOAT_VECTOR `vector`) and
     index params (HNSW, COSINE, M, efConstruction), so the index exists before the inserts;
  2. insert --rows rows in batches of --batch (id = row index): insert rows/s = rows / wall time
     of all the insert calls;
  3. flush, then poll describe_index until the index is Finished with no pending rows
     ("index wait"), then load_collection;
  4. search: --queries single-vector calls (limit 10, ef --ef, consistency Bounded) for each
     client count in --clients; C threads, each with its own MilvusClient connection, split the
     queries round-robin; QPS = queries / wall time; recall@10; per-call latency p50/p99;
  5. drop the collection (unless --keep).

Recall@10 follows ../shared/datasets/README.md: a returned row is a hit when it is in the top 10
of the ground truth, or when its inner product with the query (the dataset's f16 vectors widened to
f32, not the engine's score) is at least the 10th ground-truth similarity - 1e-6. With --rows equal
to the dataset's base size the dataset's unfiltered ground truth is used; with fewer rows the exact
top 10 over the inserted prefix is computed here by brute force.

The dataset folder may be any folder in the layout of ../shared/datasets/README.md (base.npy,
queries.npy, filters.json, gt_<name>_{ids,dists}.npy); the dimension is read from base.npy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path
from urllib.parse import urlparse, urlunparse

try:
    import numpy as np
except ImportError:  # pragma: no cover
    sys.exit("error: numpy is required (it is installed with pymilvus)")
try:
    import pymilvus
    from pymilvus import DataType, MilvusClient, MilvusException
except ImportError:  # pragma: no cover
    sys.exit("error: pymilvus is required (use /opt/vectorflow-milvus/venv/bin/python)")

K = 10  # recall@K and search limit
DEFAULT_DATASET = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "pypi-100k"


class BenchError(Exception):
    """A failure with a message meant for the user (no traceback needed)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- dataset


def load_dataset(folder: Path, rows: int | None, queries: int | None):
    """Returns (base f32 [rows, dim], queries f32 [q, dim], gt_ids [q, K], gt_kth_sim [q], gt_source)."""
    for name in ("base.npy", "queries.npy"):
        if not (folder / name).is_file():
            raise BenchError(f"dataset folder {folder} has no {name} (see shared/datasets/README.md)")
    base_all = np.load(folder / "base.npy", mmap_mode="r")
    q_all = np.load(folder / "queries.npy", mmap_mode="r")
    if base_all.ndim != 2 or q_all.ndim != 2 or base_all.shape[1] != q_all.shape[1]:
        raise BenchError(f"base {base_all.shape} and queries {q_all.shape} are not matching 2-d arrays")
    n_base, n_q = base_all.shape[0], q_all.shape[0]
    rows = n_base if rows is None else rows
    queries = n_q if queries is None else queries
    if not 0 < rows <= n_base:
        raise BenchError(f"--rows {rows} outside 1..{n_base} (the dataset's base size)")
    if not 0 < queries <= n_q:
        raise BenchError(f"--queries {queries} outside 1..{n_q} (the dataset's query count)")

    # Widen the f16 vectors to f32 (what the engines get, and what the ground truth was computed on).
    base = np.ascontiguousarray(base_all[:rows], dtype=np.float32)
    qs = np.ascontiguousarray(q_all[:queries], dtype=np.float32)

    gt_ids = gt_kth = None
    source = None
    if rows == n_base:
        ids_file, dists_file = unfiltered_gt_files(folder)
        if ids_file and (folder / ids_file).is_file() and (folder / dists_file).is_file():
            ids = np.load(folder / ids_file, mmap_mode="r")
            dists = np.load(folder / dists_file, mmap_mode="r")
            if ids.shape[0] >= queries and ids.shape[1] >= K:
                gt_ids = np.asarray(ids[:queries, :K], dtype=np.int64)
                gt_kth = np.asarray(dists[:queries, K - 1], dtype=np.float32)
                source = ids_file
    if gt_ids is None:
        gt_ids, gt_kth = brute_force_topk(base, qs, K)
        source = f"exact top-{K} over the {rows} inserted rows (numpy brute force)"
    return base, qs, gt_ids, gt_kth, source


def unfiltered_gt_files(folder: Path):
    """The unfiltered ground truth's file names from filters.json (defaults if it is absent)."""
    ids_file, dists_file = "gt_unfiltered_ids.npy", "gt_unfiltered_dists.npy"
    meta = folder / "filters.json"
    if meta.is_file():
        try:
            gts = json.loads(meta.read_text()).get("ground_truth", {})
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot read {meta}: {e}") from e
        for name, gt in gts.items():
            if gt.get("expression") is None:  # the unfiltered one
                return gt.get("ids_file", ids_file), gt.get("dists_file", dists_file)
        return None, None
    return ids_file, dists_file


def brute_force_topk(base: np.ndarray, qs: np.ndarray, k: int):
    """Exact top-k by inner product (= cosine on the normalised vectors)."""
    k = min(k, base.shape[0])
    ids = np.empty((qs.shape[0], k), dtype=np.int64)
    kth = np.empty(qs.shape[0], dtype=np.float32)
    for lo in range(0, qs.shape[0], 256):
        sims = qs[lo : lo + 256] @ base.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        psims = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-psims, axis=1, kind="stable")
        ids[lo : lo + 256] = np.take_along_axis(part, order, axis=1)
        kth[lo : lo + 256] = np.take_along_axis(psims, order, axis=1)[:, k - 1]
    return ids, kth


def recall_at_k(results: list, base: np.ndarray, qs: np.ndarray, gt_ids: np.ndarray, gt_kth: np.ndarray):
    """Mean recall@K with the dataset README's tie rule; also counts out-of-range ids returned."""
    hits = 0
    bad_ids = 0
    n = base.shape[0]
    for qi, got in enumerate(results):
        truth = set(gt_ids[qi, :K].tolist())
        for rid in got[:K]:
            if rid in truth:
                hits += 1
            elif 0 <= rid < n:
                if float(base[rid] @ qs[qi]) >= float(gt_kth[qi]) - 1e-6:
                    hits += 1
            else:
                bad_ids += 1
    denom = len(results) * min(K, n)
    return hits / denom if denom else float("nan"), bad_ids


# --------------------------------------------------------------------------- milvus calls


def uri_kind(uri: str) -> str:
    return "milvus-lite" if uri.endswith(".db") else "grpc"


def redact(uri: str) -> str:
    """The uri without any user:password part (it goes into the JSON)."""
    if uri.endswith(".db"):
        return uri
    p = urlparse(uri)
    if p.username or p.password:
        host = p.hostname or ""
        if p.port:
            host += f":{p.port}"
        return urlunparse(p._replace(netloc=host))
    return uri


def connect(args, dedicated: bool = False) -> MilvusClient:
    """A MilvusClient; dedicated=True gives it its own gRPC channel (pymilvus shares one per uri)."""
    kwargs = {"uri": args.uri, "timeout": args.connect_timeout, "dedicated": dedicated}
    token = args.token if args.token is not None else os.environ.get("MILVUS_TOKEN", "")
    if token:
        kwargs["token"] = token
    if args.db_name:
        kwargs["db_name"] = args.db_name
    try:
        return MilvusClient(**kwargs)
    except Exception as e:  # MilvusException, grpc errors, connection config errors
        hint = ""
        if uri_kind(args.uri) == "grpc":
            hint = " (is the server running and listening on that address?)"
        raise BenchError(f"cannot connect to {redact(args.uri)}{hint}: {e}") from e


def call(what: str, fn, *a, **kw):
    """Runs one pymilvus call, turning a failure into a BenchError naming the step."""
    try:
        return fn(*a, **kw)
    except MilvusException as e:
        raise BenchError(f"{what} failed: code={e.code} {e.message}") from e
    except Exception as e:
        raise BenchError(f"{what} failed: {type(e).__name__}: {e}") from e


def server_version_of(client: MilvusClient, args):
    """The server's version string, or None (milvus-lite does not implement GetVersion)."""
    if uri_kind(args.uri) == "milvus-lite":
        try:
            import milvus_lite  # noqa: PLC0415

            return f"milvus-lite {getattr(milvus_lite, '__version__', '?')}"
        except ImportError:
            return "milvus-lite"
    quiet = logging.getLogger("pymilvus")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # pymilvus logs a traceback for an unimplemented call
    try:
        return client.get_server_version(timeout=args.timeout)
    except Exception:
        return None
    finally:
        quiet.setLevel(level)


def create_collection(client: MilvusClient, args, dim: int) -> None:
    name = args.collection
    exists = call("has_collection", client.has_collection, name, timeout=args.timeout)
    if exists:
        if not args.replace:
            raise BenchError(
                f"collection {name!r} already exists on {redact(args.uri)}; pass --replace to drop it "
                f"first, or --collection to use another name"
            )
        log(f"dropping the existing collection {name!r} (--replace)")
        call("drop_collection", client.drop_collection, name, timeout=args.timeout)

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index_params = MilvusClient.prepare_index_params()
    index_params.add_index(
        field_name="vector",
        index_type=args.index_type,
        metric_type="COSINE",
        params=build_params(args),
    )
    try:
        call(
            "create_collection",
            client.create_collection,
            name,
            schema=schema,
            index_params=index_params,
            timeout=args.timeout,
        )
    except BenchError as e:
        # create_collection creates the collection, then its index: drop a half-made collection.
        try:
            if client.has_collection(name, timeout=args.timeout):
                client.drop_collection(name, timeout=args.timeout)
        except Exception:
            pass
        if uri_kind(args.uri) == "milvus-lite" and "local mode only support" in str(e):
            raise BenchError(
                f"{e}\n  milvus-lite has no HNSW; rerun with --index-type AUTOINDEX, IVF_FLAT or FLAT "
                f"(the comparison is then not like for like: note it with the results)"
            ) from e
        raise


def build_params(args) -> dict:
    """Index build parameters for --index-type."""
    if args.index_type == "HNSW":
        return {"M": args.m, "efConstruction": args.ef_construction}
    if args.index_type == "IVF_FLAT":
        return {"nlist": args.nlist}
    return {}


def search_params_of(args) -> dict:
    """Search parameters for --index-type (ef for HNSW and AUTOINDEX, nprobe for IVF_FLAT)."""
    if args.index_type in ("HNSW", "AUTOINDEX"):
        return {"params": {"ef": args.ef}}
    if args.index_type == "IVF_FLAT":
        return {"params": {"nprobe": args.nprobe}}
    return {"params": {}}


def index_name_of(client: MilvusClient, args) -> str:
    names = call("list_indexes", client.list_indexes, args.collection, field_name="vector", timeout=args.timeout)
    if not names:
        raise BenchError(f"collection {args.collection!r} has no index on field 'vector' after create_collection")
    return names[0]


def insert_all(client: MilvusClient, args, base: np.ndarray) -> tuple[float, int]:
    """Inserts every row in batches; returns (wall seconds of the insert calls, rows acknowledged)."""
    n = base.shape[0]
    acked = 0
    spent = 0.0
    last_log = time.perf_counter()
    for lo in range(0, n, args.batch):
        hi = min(lo + args.batch, n)
        rows = [{"id": i, "vector": base[i]} for i in range(lo, hi)]  # built outside the timed call
        t0 = time.perf_counter()
        # A server under backpressure answers RateLimit; pymilvus retries that with backoff until
        # `timeout`, so the generous insert timeout absorbs it (the wait counts in the insert time).
        res = call(f"insert rows {lo}..{hi}", client.insert, args.collection, rows, timeout=args.insert_timeout)
        spent += time.perf_counter() - t0
        count = res.get("insert_count", hi - lo) if isinstance(res, dict) else hi - lo
        if count != hi - lo:
            raise BenchError(f"insert rows {lo}..{hi}: server acknowledged {count} of {hi - lo} rows")
        acked += count
        if time.perf_counter() - last_log > 10:
            log(f"  inserted {acked}/{n} rows ({acked / spent:,.0f} rows/s so far)")
            last_log = time.perf_counter()
    return spent, acked


def wait_for_index(client: MilvusClient, args, index_name: str) -> tuple[float, dict]:
    """Polls describe_index until Finished with no pending rows; returns (seconds, last description)."""
    t0 = time.perf_counter()
    deadline = t0 + args.index_timeout
    last_log = t0
    desc: dict = {}
    while True:
        desc = call("describe_index", client.describe_index, args.collection, index_name, timeout=args.timeout)
        if desc is None:
            raise BenchError(f"describe_index: index {index_name!r} not found on {args.collection!r}")
        state = str(desc.get("state", ""))
        pending = int(desc.get("pending_index_rows", 0) or 0)
        if state == "Failed":
            raise BenchError(f"index build failed: {desc.get('index_state_fail_reason') or desc}")
        if state == "Finished" and pending == 0:
            return time.perf_counter() - t0, desc
        now = time.perf_counter()
        if now > deadline:
            raise BenchError(
                f"index not finished after {args.index_timeout:.0f}s (--index-timeout): state={state} "
                f"pending_index_rows={pending} indexed_rows={desc.get('indexed_rows')} "
                f"total_rows={desc.get('total_rows')}"
            )
        if now - last_log > 15:
            log(
                f"  index: state={state} indexed_rows={desc.get('indexed_rows')} "
                f"pending_index_rows={pending} total_rows={desc.get('total_rows')}"
            )
            last_log = now
        time.sleep(args.poll)


def hit_ids(res) -> list:
    """Primary keys of one single-vector search result, nearest first."""
    if not res:
        return []
    hits = res[0]
    out = []
    for h in hits:
        try:
            out.append(int(h["id"]))
        except (KeyError, TypeError):
            out.append(int(h.get("entity", {}).get("id")))
    return out


def search_run(args, qs: np.ndarray, clients: int, search_params: dict):
    """Runs all queries with `clients` threads; returns (wall s, results per query, latencies s)."""
    nq = qs.shape[0]
    conns = [connect(args, dedicated=True) for _ in range(clients)]
    results: list = [None] * nq
    lat = np.zeros(nq, dtype=np.float64)
    errors: list = []
    barrier = threading.Barrier(clients + 1)

    def worker(t: int) -> None:
        c = conns[t]
        mine = range(t, nq, clients)  # round-robin split
        try:
            barrier.wait()
            for qi in mine:
                if errors:
                    return
                t0 = time.perf_counter()
                res = c.search(
                    args.collection,
                    data=[qs[qi]],
                    limit=K,
                    anns_field="vector",
                    search_params=search_params,
                    # Bounded: this measures steady-state reads, as serving traffic would run them;
                    # Strong would make every call wait for the newest write timestamp, which
                    # measures the consistency protocol rather than the search.
                    consistency_level="Bounded",
                    timeout=args.timeout,
                )
                lat[qi] = time.perf_counter() - t0
                results[qi] = hit_ids(res)
        except threading.BrokenBarrierError:
            return
        except Exception as e:
            errors.append((t, e))
            barrier.abort()

    try:
        # A few untimed calls first (connection set-up, caches), on the first connection.
        for qi in range(min(args.warmup, nq)):
            call(
                "warm-up search",
                conns[0].search,
                args.collection,
                data=[qs[qi]],
                limit=K,
                anns_field="vector",
                search_params=search_params,
                consistency_level="Bounded",
                timeout=args.timeout,
            )
        threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(clients)]
        for th in threads:
            th.start()
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    finally:
        for c in conns:
            try:
                c.close()
            except Exception:
                pass
    if errors:
        t, e = errors[0]
        msg = f"code={e.code} {e.message}" if isinstance(e, MilvusException) else f"{type(e).__name__}: {e}"
        raise BenchError(f"search failed in client thread {t} ({clients} clients): {msg}")
    return wall, results, lat


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark a Milvus-protocol endpoint (Vectorflow or Milvus) through pymilvus MilvusClient.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--uri", required=True, help="http://HOST:PORT for a server, or a path ending in .db for milvus-lite")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="dataset folder (shared/datasets layout)")
    p.add_argument("--rows", type=int, default=None, help="rows to insert (None: the whole base)")
    p.add_argument("--queries", type=int, default=None, help="queries per search run (None: all)")
    p.add_argument("--clients", default="1,8", help="comma-separated client (thread) counts, one search run each")
    p.add_argument("--ef", type=int, default=64, help="ef at search time (HNSW, AUTOINDEX)")
    p.add_argument("--batch", type=int, default=1000, help="rows per insert call")
    p.add_argument("--label", default=None, help="name for this run in the table and JSON (None: the uri kind)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the collection at the end (otherwise it is dropped)")
    p.add_argument("--collection", default="vf_pymilvus_bench", help="collection name")
    p.add_argument("--replace", action="store_true", help="drop the collection first if it already exists")
    p.add_argument("--index-type", default="HNSW", choices=["HNSW", "AUTOINDEX", "IVF_FLAT", "FLAT"],
                   help="index type (milvus-lite has only AUTOINDEX, IVF_FLAT, FLAT)")
    p.add_argument("--nlist", type=int, default=1024, help="IVF_FLAT nlist")
    p.add_argument("--nprobe", type=int, default=16, help="IVF_FLAT nprobe at search time")
    p.add_argument("--m", type=int, default=16, help="HNSW M")
    p.add_argument("--ef-construction", type=int, default=200, help="HNSW efConstruction")
    p.add_argument("--warmup", type=int, default=10, help="untimed searches before each run")
    p.add_argument("--settle", type=float, default=0.0, help="seconds to wait after load, before searching")
    p.add_argument("--timeout", type=float, default=120.0, help="timeout (s) for each ordinary pymilvus call")
    p.add_argument("--insert-timeout", type=float, default=600.0,
                   help="timeout (s) for one insert call, including pymilvus's rate-limit retries")
    p.add_argument("--flush-timeout", type=float, default=1800.0, help="timeout (s) for flush")
    p.add_argument("--load-timeout", type=float, default=1800.0, help="timeout (s) for load_collection")
    p.add_argument("--index-timeout", type=float, default=1800.0, help="give up waiting for the index after this (s)")
    p.add_argument("--connect-timeout", type=float, default=60.0, help="timeout (s) to connect")
    p.add_argument("--poll", type=float, default=0.5, help="describe_index poll interval (s)")
    p.add_argument("--token", default=None, help="token or user:password (None: env MILVUS_TOKEN, if set)")
    p.add_argument("--db-name", default="", help="database name")
    args = p.parse_args(argv)
    try:
        args.client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not args.client_counts or any(c < 1 for c in args.client_counts):
        p.error("--clients needs at least one count >= 1")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.ef < K:
        p.error(f"--ef must be >= {K} (the search limit)")
    args.label = args.label or uri_kind(args.uri)
    return args


def index_desc(index: dict) -> str:
    extra = " ".join(f"{k}={v}" for k, v in index.items() if k not in ("type", "metric"))
    return f"{index['type']} {index['metric']}" + (f" {extra}" if extra else "")


def print_table(r: dict) -> None:
    print()
    print(f"== {r['label']} ({r['uri_kind']}, {r['uri']}) server {r.get('server_version') or '?'}")
    print(f"   dataset {r['dataset']}: {r['rows']} rows x {r['dim']}d, {r['queries']} queries, "
          f"{index_desc(r['index'])}, search {r.get('search_params')}")
    print(f"   ground truth: {r['ground_truth']}")
    print(f"   insert       {r['insert_s']:9.2f} s   {r['insert_rows_per_s']:12,.0f} rows/s   (batch {r['batch']})")
    print(f"   flush        {r['flush_s']:9.2f} s")
    print(f"   index wait   {r['index_wait_s']:9.2f} s")
    print(f"   load         {r['load_s']:9.2f} s")
    print()
    hdr = f"   {'clients':>7} {'queries':>7} {'wall s':>8} {'QPS':>9} {'recall@10':>9} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}"
    print(hdr)
    print("   " + "-" * (len(hdr) - 3))
    for s in r["search"]:
        print(f"   {s['clients']:>7} {s['queries']:>7} {s['wall_s']:>8.2f} {s['qps']:>9.1f} "
              f"{s['recall_at_10']:>9.4f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['mean_ms']:>8.2f}")
    print()


def run(args) -> dict:
    log(f"loading dataset {args.dataset}")
    base, qs, gt_ids, gt_kth, gt_source = load_dataset(args.dataset, args.rows, args.queries)
    rows, dim = base.shape
    log(f"  {rows} rows x {dim}d, {qs.shape[0]} queries; ground truth: {gt_source}")

    if uri_kind(args.uri) == "milvus-lite":
        Path(args.uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    log(f"connecting to {redact(args.uri)}")
    client = connect(args)
    server_version = server_version_of(client, args)

    result = {
        "label": args.label,
        "uri_kind": uri_kind(args.uri),
        "uri": redact(args.uri),
        "server_version": server_version,
        "pymilvus": pymilvus.__version__,
        "dataset": str(args.dataset),
        "rows": rows,
        "dim": dim,
        "queries": int(qs.shape[0]),
        "batch": args.batch,
        "ef": args.ef,
        "limit": K,
        "consistency": "Bounded",
        "index": {"type": args.index_type, "metric": "COSINE", **build_params(args)},
        "ground_truth": gt_source,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    created = False
    try:
        log(f"creating collection {args.collection!r} ({index_desc(result['index'])})")
        create_collection(client, args, dim)
        created = True
        index_name = index_name_of(client, args)

        log(f"inserting {rows} rows in batches of {args.batch}")
        insert_s, acked = insert_all(client, args, base)
        result["insert_s"] = insert_s
        result["insert_rows_per_s"] = acked / insert_s if insert_s > 0 else None
        log(f"  {acked} rows in {insert_s:.2f}s = {result['insert_rows_per_s']:,.0f} rows/s")

        log("flush")
        t0 = time.perf_counter()
        call("flush", client.flush, args.collection, timeout=args.flush_timeout)
        result["flush_s"] = time.perf_counter() - t0
        log(f"  flush {result['flush_s']:.2f}s; waiting for index {index_name!r}")
        index_wait_s, desc = wait_for_index(client, args, index_name)
        result["index_wait_s"] = index_wait_s
        result["index_description"] = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in desc.items()}
        log(f"  index finished after {index_wait_s:.2f}s: indexed_rows={desc.get('indexed_rows')} "
            f"total_rows={desc.get('total_rows')} index_type={desc.get('index_type')}")
        if not desc.get("total_rows"):
            # milvus-lite answers Finished with total_rows 0 at once: its index wait says nothing.
            log("  note: the server reports total_rows=0 for the index; the index wait is not meaningful")
            result["index_wait_note"] = "server reported state Finished with total_rows=0"

        log("load_collection")
        t0 = time.perf_counter()
        call("load_collection", client.load_collection, args.collection, timeout=args.load_timeout)
        result["load_s"] = time.perf_counter() - t0

        stats = call("get_collection_stats", client.get_collection_stats, args.collection, timeout=args.timeout)
        result["row_count"] = stats.get("row_count")
        if stats.get("row_count") != rows:
            log(f"  WARNING: get_collection_stats row_count={stats.get('row_count')}, inserted {rows}")

        if args.settle > 0:
            # Vectorflow merges sealed segments in the background once their
            # graphs are built; searches during that share the cores with
            # the merge builds. --settle measures the steady state after.
            log(f"settling {args.settle:.0f} s before searching")
            time.sleep(args.settle)
            result["settle_s"] = args.settle

        search_params = search_params_of(args)
        result["search_params"] = search_params
        result["search"] = []
        for c in args.client_counts:
            log(f"search: {qs.shape[0]} queries, {c} client(s), ef={args.ef}")
            wall, res, lat = search_run(args, qs, c, search_params)
            recall, bad = recall_at_k(res, base, qs, gt_ids, gt_kth)
            short = sum(1 for r in res if len(r) < min(K, rows))
            entry = {
                "clients": c,
                "queries": int(qs.shape[0]),
                "wall_s": wall,
                "qps": qs.shape[0] / wall,
                "recall_at_10": recall,
                "p50_ms": float(np.percentile(lat, 50) * 1e3),
                "p99_ms": float(np.percentile(lat, 99) * 1e3),
                "mean_ms": float(lat.mean() * 1e3),
                "results_short_of_10": short,
                "out_of_range_ids": bad,
            }
            result["search"].append(entry)
            log(f"  {entry['qps']:.1f} QPS, recall@10 {recall:.4f}, p50 {entry['p50_ms']:.2f} ms, "
                f"p99 {entry['p99_ms']:.2f} ms")
            if short or bad:
                log(f"  WARNING: {short} results had fewer than {K} hits, {bad} ids outside 0..{rows - 1}")

        result["qps"] = {str(s["clients"]): s["qps"] for s in result["search"]}
        one = next((s for s in result["search"] if s["clients"] == 1), None)
        result["recall_at_10"] = result["search"][0]["recall_at_10"]
        result["p50_ms"] = one["p50_ms"] if one else None
        result["p99_ms"] = one["p99_ms"] if one else None
    finally:
        if created and not args.keep:
            try:
                client.drop_collection(args.collection, timeout=args.timeout)
                log(f"dropped collection {args.collection!r}")
            except Exception as e:
                log(f"WARNING: drop_collection failed: {e}")
        try:
            client.close()
        except Exception:
            pass
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
