"""Load on `booth serve`: N concurrent txt2img requests, /progress latency under load, server memory.

Starts `booth serve` in a subprocess on a tiny random model (or --model), sends --requests concurrent
`/sdapi/v1/txt2img` requests (httpx + asyncio, one connection each) while polling `/sdapi/v1/progress` every
--poll seconds, and checks every answer: HTTP 200, one PNG of the asked size, `info.all_seeds` == the request's
seed, `parameters.prompt` echoed. Repeats --rounds times and reports the server's RSS after a warm-up request
and after each round (flat = the queue holds no per-request memory).

    python benchmarks/server_load.py                      # 100 requests x 2 rounds, tiny model, CPU
    python benchmarks/server_load.py --requests 20 --rounds 1
    python benchmarks/server_load.py --model DIR --steps 20 --size 512

`run_load(base_url, n, ...)` is also used by tests/test_server_webuiapi.py against an in-process server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(response, seed: int, prompt: str, size: int) -> str | None:
    """None when the answer is right, else what is wrong."""
    from PIL import Image

    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    body = response.json()
    if set(body) != {"images", "parameters", "info"} or len(body["images"]) != 1:
        return f"bad shape: {sorted(body)}"
    info = json.loads(body["info"])
    if info.get("all_seeds") != [seed] or body["parameters"].get("prompt") != prompt:
        return f"wrong job: seeds {info.get('all_seeds')} for seed {seed}"
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    if image.size != (size, size) or f"Seed: {seed}," not in image.info.get("parameters", ""):
        return f"wrong image {image.size}"
    return None


async def run_load(
    base_url: str, n: int, *, steps: int = 2, size: int = 32, poll: float = 0.1, seed0: int = 1000, auth=None
) -> dict:
    """Send `n` concurrent txt2img requests and poll /progress until all are answered; return statistics."""
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits, auth=auth) as client:
        done = asyncio.Event()
        latencies: list[float] = []
        progress_seen: list[float] = []
        progress_errors = 0

        async def poller():
            nonlocal progress_errors
            while not done.is_set():
                start = time.perf_counter()
                r = await client.get("/sdapi/v1/progress", params={"skip_current_image": "false"})
                latencies.append(time.perf_counter() - start)
                if r.status_code == 200:
                    progress_seen.append(r.json()["progress"])
                else:
                    progress_errors += 1
                await asyncio.sleep(poll)

        async def one(i: int):
            seed, prompt = seed0 + i, f"load test {i}"
            body = {"prompt": prompt, "seed": seed, "steps": steps, "width": size, "height": size}
            body["sampler_name"] = "Euler"
            r = await client.post("/sdapi/v1/txt2img", json=body)
            return _check(r, seed, prompt, size)

        started = time.perf_counter()
        poll_task = asyncio.create_task(poller())
        results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        wall = time.perf_counter() - started
        done.set()
        await poll_task
    problems = [r if isinstance(r, str) else repr(r) for r in results if r is not None]
    return {
        "requests": n,
        "ok": n - len(problems),
        "problems": problems[:5],
        "wall_s": wall,
        "jobs_per_s": n / wall if wall else 0.0,
        "progress_polls": len(latencies),
        "progress_errors": progress_errors,
        "progress_max_seen": max(progress_seen, default=0.0),
        "progress_median_ms": 1000 * statistics.median(latencies) if latencies else None,
        "progress_p95_ms": 1000 * sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else None,
        "progress_max_ms": 1000 * max(latencies) if latencies else None,
    }


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:  # noqa: BLE001 - optional
        return None


def wait_ready(base_url: str, process, timeout: float = 180.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(base_url + "/sdapi/v1/progress", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("server did not start")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--poll", type=float, default=0.1, help="seconds between /progress polls")
    p.add_argument("--model", default=None, help="model for the server (default: a tiny random SD1 model)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from booth.models.tiny import tiny_pipeline

            model = str(Path(tmp) / "tiny-sd1")
            tiny_pipeline("sd1").save_pretrained(model)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "booth", "serve", "--model", model, "--port", str(port)]
        cmd += ["--data-dir", str(Path(tmp) / "data"), "--log-level", "warning"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        server = subprocess.Popen(cmd, env=env)
        try:
            wait_ready(base_url, server)
            warm = asyncio.run(run_load(base_url, 1, steps=args.steps, size=args.size, seed0=1))
            assert warm["ok"] == 1, warm
            rss = [rss_bytes(server.pid)]
            print(f"server pid {server.pid}, RSS after warm-up: {rss[0] / 2**20:.1f} MiB")
            for round_no in range(args.rounds):
                stats = asyncio.run(
                    run_load(base_url, args.requests, steps=args.steps, size=args.size, poll=args.poll)
                )
                rss.append(rss_bytes(server.pid))
                print(
                    f"round {round_no + 1}: {stats['ok']}/{stats['requests']} answered correctly in "
                    f"{stats['wall_s']:.1f} s ({stats['jobs_per_s']:.1f} jobs/s); /progress: "
                    f"{stats['progress_polls']} polls, median {stats['progress_median_ms']:.1f} ms, "
                    f"p95 {stats['progress_p95_ms']:.1f} ms, max {stats['progress_max_ms']:.1f} ms, "
                    f"errors {stats['progress_errors']}; RSS {rss[-1] / 2**20:.1f} MiB"
                )
                for problem in stats["problems"]:
                    print(f"  problem: {problem}")
            growth = (rss[-1] - rss[1]) / 2**20 if len(rss) > 2 else 0.0
            print(
                f"RSS MiB: {' -> '.join(f'{r / 2**20:.1f}' for r in rss)} (growth after round 1: {growth:+.1f})"
            )
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
