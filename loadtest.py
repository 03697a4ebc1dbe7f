"""Load-test serve_creditmix.py on this machine: throughput and p50/p99 latency at 1, 8 and 32 concurrent clients,
micro-batching on vs off (or mixed-adapter batches vs one batch per adapter), errors, and the server's RSS. Loopback
only.

    python loadtest.py                                          # starts uvicorn serving smollm2-135m, batching on then off
    python loadtest.py --server_threads 1 --requests 64 --rss_requests 300 --max_seconds 20   # a quick pass
    python loadtest.py --make_adapters runs/bench_adapters --endpoints base,sft,kd,dpo --modes on,per_adapter \
        --concurrency 32 --server_threads 2               # four endpoints of one base: mixed batches vs per adapter
    python loadtest.py --url http://127.0.0.1:8000 --endpoint sft --server_pid 12345   # a server you started yourself

Without --url it starts `python -m uvicorn serve_creditmix:app --host 127.0.0.1` once per mode (on: micro-batching with
mixed-adapter batches over the stacked LoRA forward; per_adapter: micro-batching, one forward pass per adapter,
MIXED_ADAPTERS=0; peft_mixed: mixed-adapter batches through PEFT's own loop over the adapters, STACKED_LORA=0; off: one
forward pass per request) with MODEL_<ENDPOINT>=--model (and --adapters / --make_adapters for sft, kd, dpo), waits for
/health, loads the first endpoint with a warm-up request, reads the RSS, warms the other endpoints, then runs each
concurrency level: --requests requests per level (or fewer if --max_seconds runs out first), spread round-robin over
--endpoints, each client sending its next request as soon as the last one is answered. Features cycle through --data.
The mean gathered batch per level comes from the server's /metrics. RSS is read from /proc/<pid>/status: after the
first endpoint's warm-up ("one endpoint"), after every endpoint's ("all endpoints") and around --rss_requests requests
in the first mode. Bounded: at most modes x levels x --requests + --rss_requests requests, --max_seconds per level.
The client shares the machine with the server (on a 2-core CPU it takes some of the server's time): compare modes,
not machines.
"""
import asyncio
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import cli
from fileio import UserError, read_records, user_errors, write_json

ROOT = Path(__file__).resolve().parent
ENDPOINTS = ["base", "sft", "kd", "dpo"]
MODES = {"on": {"MICRO_BATCHING": "1"}, "per_adapter": {"MICRO_BATCHING": "1", "MIXED_ADAPTERS": "0"},
         "peft_mixed": {"MICRO_BATCHING": "1", "STACKED_LORA": "0"}, "off": {"MICRO_BATCHING": "0"}}
FALLBACK_FEATURES = [
    "Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, Outstanding Debt: 809.98, "
    "Credit Utilization Ratio: 35.03, Payment Behaviour: Low_spent_Small_value_payments",
    "Age: 41, Occupation: Lawyer, Annual Income: 98020.5, Outstanding Debt: 120.4, "
    "Credit Utilization Ratio: 24.1, Payment Behaviour: High_spent_Large_value_payments",
]


def parse_args(argv=None):
    p = cli.parser(__doc__)
    # model
    p.add_argument("--model", default="smollm2-135m", help="model the started server serves on --endpoint")
    p.add_argument("--endpoint", default="base", choices=ENDPOINTS, help="POST /infer/<endpoint>")
    p.add_argument("--endpoints", default=None,
                   help="comma-separated endpoints to spread the clients over (overrides --endpoint), e.g. "
                        "base,sft,kd,dpo")
    p.add_argument("--adapters", default=None,
                   help="for the started server: models of other endpoints, e.g. sft=runs/creditmix_sft,kd=runs/x")
    p.add_argument("--make_adapters", default=None,
                   help="for the started server: save fresh LoRA runs (random, r=16, all projections) on --model "
                        "for sft, kd and dpo under this folder (kept and reused), and serve them")
    # data
    p.add_argument("--data", default="data/creditmix_val.jsonl",
                   help="JSONL with a 'features' field to cycle through (two built-in rows if absent)")
    # run
    p.add_argument("--url", default=None,
                   help="target this running server instead of starting one (loopback addresses only)")
    p.add_argument("--server_pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    p.add_argument("--api_key", default=None, help="bearer key if the server needs one (None: $API_KEY)")
    p.add_argument("--modes", default="on,off",
                   help="without --url: server modes, in order: on (micro-batching, mixed-adapter batches), "
                        "per_adapter (micro-batching, one forward pass per adapter), peft_mixed (mixed-adapter "
                        "batches through PEFT's loop, STACKED_LORA=0), off (no micro-batching)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level (upper bound)")
    p.add_argument("--max_seconds", type=float, default=60, help="time limit per level, seconds")
    p.add_argument("--rss_requests", type=int, default=2000,
                   help="requests between the two RSS readings (first mode only; 0 skips)")
    p.add_argument("--rss_concurrency", type=int, default=8, help="concurrent clients for the RSS run")
    p.add_argument("--rss_max_seconds", type=float, default=900, help="time limit of the RSS run, seconds")
    p.add_argument("--batch_wait_ms", type=float, default=5, help="BATCH_WAIT_MS of the started server")
    p.add_argument("--max_batch", type=int, default=32, help="MAX_BATCH of the started server")
    p.add_argument("--server_threads", type=int, default=0,
                   help="OMP_NUM_THREADS of the started server (0 = inherit). On a CPU shared with other work use 1: "
                        "torch's spinning threads slow a 2-thread forward pass down ~10x there")
    p.add_argument("--timeout", type=float, default=120, help="per-request timeout, seconds")
    p.add_argument("--startup_timeout", type=float, default=300, help="seconds to wait for /health and the load")
    # output
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.api_key = args.api_key or os.environ.get("API_KEY")  # resolved here: --help never prints the key
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in args.modes):
        p.error(f"--modes: use some of {', '.join(MODES)}")
    args.endpoints = [e.strip() for e in (args.endpoints or args.endpoint).split(",") if e.strip()]
    if any(e not in ENDPOINTS for e in args.endpoints):
        p.error(f"--endpoints: choose from {', '.join(ENDPOINTS)}")
    args.adapters = dict(kv.split("=", 1) for kv in args.adapters.split(",")) if args.adapters else {}
    if any(k not in ENDPOINTS for k in args.adapters):
        p.error(f"--adapters: endpoint names are {', '.join(ENDPOINTS)}")
    if any(c < 1 for c in args.concurrency) or args.requests < 1 or args.max_seconds <= 0:
        p.error("--concurrency, --requests and --max_seconds must be positive")
    return args


# ----------------------------------------------------------------------------------------------------------------

def require_loopback(url: str) -> str:
    """Refuse any host that resolves to a non-loopback address: this tool floods a server, never the network."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UserError(f"--url {url}: expected http://127.0.0.1:PORT")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(u.hostname, u.port or 80, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        raise UserError(f"--url {url}: cannot resolve {u.hostname} ({e})") from None
    bad = [a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if bad:
        raise UserError(f"--url {url}: {u.hostname} is not a loopback address ({', '.join(sorted(bad))}); "
                        "loadtest.py only targets this machine (127.0.0.1 / ::1 / localhost)")
    return url.rstrip("/")


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(base: str, folder: str) -> dict[str, str]:
    """Fresh LoRA runs on `base` for sft, kd and dpo (random A and B, so each changes the answers), saved once."""
    import torch
    from peft import get_peft_model

    from common import load_model, lora_config
    out = {}
    for seed, name in enumerate(["sft", "kd", "dpo"]):
        d = Path(folder) / name
        out[name] = str(d)
        if (d / "adapter_config.json").is_file():
            continue
        torch.manual_seed(seed)
        model, _, _ = load_model(base, quantize="none")
        cfg = lora_config(model)
        cfg.init_lora_weights = False
        get_peft_model(model, cfg).save_pretrained(d)
        write_json(d / "run.json", {"base_model": base, "note": "random LoRA made by loadtest.py --make_adapters"})
    return out


def start_server(args, mode: str, log_path: Path):
    port = free_port()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the caller's packages too
    env = {**os.environ, "PYTHONPATH": path, "MODEL_BASE": args.model, **MODES[mode],
           "BATCH_WAIT_MS": str(args.batch_wait_ms), "MAX_BATCH": str(args.max_batch)}
    env.update({f"MODEL_{e.upper()}": args.model for e in args.endpoints})
    env.update({f"MODEL_{e.upper()}": m for e, m in args.adapters.items()})
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "serve_creditmix:app", "--host", "127.0.0.1",
                             "--port", str(port), "--no-access-log", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_ready(client, url: str, proc, deadline: float, log_path: Path) -> None:
    import httpx
    while True:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"the server exited ({proc.returncode}); its log:\n{log_path.read_text()[-3000:]}")
        try:
            if (await client.get(f"{url}/health", timeout=2)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise UserError(f"{url}/health did not answer in time")
        await asyncio.sleep(0.25)


async def batch_stats(client, url: str) -> tuple[float, float]:
    """(gathered batches, items) so far on the CreditMix lanes, from the server's Prometheus /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    r = await client.get(f"{url}/metrics")
    count = total = 0.0
    if r.status_code == 200:
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                if s.labels.get("lane_task") == "creditmix" and s.name == "serve_lane_batch_size_count":
                    count += s.value
                elif s.labels.get("lane_task") == "creditmix" and s.name == "serve_lane_batch_size_sum":
                    total += s.value
    return count, total


async def run_level(client, url: str, paths: list[str], features: list[str], clients: int, n: int,
                    max_seconds: float, timeout: float) -> dict:
    """`clients` workers send up to `n` requests in all (none started after max_seconds), round-robin over
    `paths`; latency per request."""
    import httpx
    import numpy as np
    latencies, errors, sent = [], {}, 0
    stop_at = time.monotonic() + max_seconds

    async def worker():
        nonlocal sent
        while sent < n and time.monotonic() < stop_at:
            i = sent
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await client.post(url + paths[i % len(paths)], json={"features": features[i % len(features)]},
                                      timeout=timeout)
                ok = r.status_code == 200 and "prediction" in r.json()
                why = None if ok else f"HTTP {r.status_code}"
            except (httpx.HTTPError, ValueError) as e:
                why = type(e).__name__
            if why:
                errors[why] = errors.get(why, 0) + 1
            else:
                latencies.append(time.perf_counter() - t0)

    b0 = await batch_stats(client, url)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    b1 = await batch_stats(client, url)
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    batches, items = b1[0] - b0[0], b1[1] - b0[1]
    return {"clients": clients, "requests": sent, "ok": len(latencies), "errors": sum(errors.values()),
            "error_kinds": errors, "wall_s": round(wall, 2), "req_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_batch": round(items / batches, 2) if batches else None}


async def run_mode(args, mode: str | None, features: list[str], measure_rss: bool) -> dict:
    import httpx
    paths = [f"/infer/{e}" for e in args.endpoints]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc, log_path = None, Path(tempfile.mkstemp(prefix="loadtest-server-", suffix=".log")[1])
    if args.url:
        url, pid = args.url, args.server_pid
    else:
        proc, url = start_server(args, mode, log_path)
        pid = proc.pid
    limits = httpx.Limits(max_connections=max(args.concurrency + [args.rss_concurrency]), max_keepalive_connections=64)
    out = {"mode": mode or "as running", "endpoints": ",".join(args.endpoints), "levels": []}
    try:
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout) as client:
            await wait_ready(client, url, proc, time.monotonic() + args.startup_timeout, log_path)
            for k, path in enumerate(paths):  # loads each endpoint's model; RSS with one, then all in use
                t0 = time.perf_counter()
                r = await client.post(url + path, json={"features": features[0]}, timeout=args.startup_timeout)
                if r.status_code != 200:
                    raise UserError(f"warm-up request to {path} failed: HTTP {r.status_code} {r.text[:300]}")
                if k == 0:
                    out["first_request_s"] = round(time.perf_counter() - t0, 2)  # includes the model load
                    await run_level(client, url, [path], features, 4, 16, args.max_seconds, args.timeout)
                    out["rss_one_endpoint_mib"] = rss_mib(pid)
            await run_level(client, url, paths, features, 4, 4 * len(paths), args.max_seconds, args.timeout)
            out["rss_all_endpoints_mib"] = rss_mib(pid)
            for c in args.concurrency:
                res = await run_level(client, url, paths, features, c, args.requests, args.max_seconds, args.timeout)
                out["levels"].append(res)
                print(f"  {out['mode']:>3} x{c:<3} {res['ok']} ok, {res['errors']} errors, {res['req_per_s']} req/s",
                      file=sys.stderr, flush=True)
            if measure_rss and args.rss_requests:
                before = rss_mib(pid)
                res = await run_level(client, url, paths, features, args.rss_concurrency, args.rss_requests,
                                      args.rss_max_seconds, args.timeout)
                after = rss_mib(pid)
                out["rss"] = {"requests": res["requests"], "errors": res["errors"], "before_mib": before,
                              "after_mib": after, "req_per_s": res["req_per_s"],
                              "growth_mib": round(after - before, 1) if before and after else None}
    finally:
        if proc is not None:
            stop_server(proc)
            log_path.unlink(missing_ok=True)
    return out


def load_features(path: str) -> list[str]:
    if not Path(path).is_file():
        print(f"NOTE: {path} not found: cycling through {len(FALLBACK_FEATURES)} built-in feature strings",
              file=sys.stderr)
        return FALLBACK_FEATURES
    rows = read_records(path, required=("features",), nonempty=("features",))
    return [r["features"] for r in rows]


def table(results: list[dict]) -> str:
    lines = ["| batching | endpoints | clients | requests | errors | req/s | p50 ms | p99 ms | mean batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in results:
        for r in m["levels"]:
            lines.append(f"| {m['mode']} | {m['endpoints']} | {r['clients']} | {r['requests']} | {r['errors']} | "
                         f"{r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                         f"{r['mean_batch'] if r['mean_batch'] else '-'} |")
    fmt = lambda v: f"{v:.1f} MiB" if v is not None else "n/a"  # noqa: E731
    for m in results:
        if m.get("rss_one_endpoint_mib") is not None:
            one, all_ = m["rss_one_endpoint_mib"], m["rss_all_endpoints_mib"]
            lines.append(f"\nserver RSS (batching {m['mode']}): {fmt(one)} with {m['endpoints'].split(',')[0]} in use, "
                         f"{fmt(all_)} with all of {m['endpoints']} in use (+{all_ - one:.1f} MiB)")
    for m in results:
        if "rss" in m:
            s = m["rss"]
            lines.append(f"\nserver RSS (batching {m['mode']}): {fmt(s['before_mib'])} before, {fmt(s['after_mib'])} "
                         f"after {s['requests']} requests ({s['errors']} errors, {s['req_per_s']} req/s); growth "
                         f"{s['growth_mib'] if s['growth_mib'] is not None else 'n/a'} MiB")
    return "\n".join(lines)


def main(args):
    # load
    if args.url:
        args.url = require_loopback(args.url)
    features = load_features(args.data)
    modes = [None] if args.url else args.modes
    if args.make_adapters and not args.url:
        args.adapters = {**make_adapters(args.model, args.make_adapters), **args.adapters}
    print(f"loadtest: {args.url or 'uvicorn serve_creditmix:app on 127.0.0.1'}, /infer/{{{','.join(args.endpoints)}}} "
          f"({args.model if not args.url else 'as configured'}), clients {args.concurrency}, <= {args.requests} "
          f"requests or {args.max_seconds:g}s per level, modes {modes}", file=sys.stderr)
    # run
    results = []
    for i, mode in enumerate(modes):
        results.append(asyncio.run(run_mode(args, mode, features, measure_rss=(i == 0))))
    # save
    print(table(results))
    if args.out:
        write_json(args.out, {"args": {k: v for k, v in vars(args).items() if k != "api_key"}, "results": results,
                              "cpu_count": os.cpu_count()})
    return results


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
