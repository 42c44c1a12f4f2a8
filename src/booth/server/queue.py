"""A persistent job queue: SQLite rows, one worker thread, jobs run one at a time in order.

Design
------
* Every job is a row of `jobs` in `<data_dir>/queue.sqlite3` (WAL mode): `id` (text, unique), `seq` (insertion
  order), `kind` ("txt2img", "img2img"; part 2 adds "train"), `status` (queued / running / done / failed /
  cancelled), `priority`, `params` (JSON snapshot of everything the job needs: request, model, options),
  `result` (JSON), `error` (JSON `{"error", "detail", "status_code"}`), `created` / `started` / `finished`
  (unix seconds), progress fields (`progress` 0..1, `step`, `total`, `eta` seconds, `message`, `metrics` JSON
  for e.g. a training loss) and `attempts`.
* What a kind does is a *runner* registered at construction: `runner.run(job, ctx) -> Outcome`. The queue knows
  nothing about generation; a training runner fits the same slots (params JSON in, result JSON out, progress via
  `ctx.report`, stop via `ctx.stop_requested`).
* One worker thread claims the next queued job (`priority DESC`, then `rank` or `seq`), marks it running, runs it, and stores
  the outcome. HTTP handlers never run jobs: they `submit` and await an asyncio future the worker resolves, so
  concurrent requests queue up instead of running concurrently (A1111 serialises with a lock; here the order is
  visible, cancellable and survives restarts).
* Restart: queued rows simply stay queued. A job still "running" in the file (the server died mid-job) is put
  back in the queue once (`max_attempts`); a job that keeps killing the server is failed instead.
* Progress is kept in memory for the running job and written to its row at most once a second.
* Control calls (`call_in_worker`) run on the worker thread between jobs (e.g. unloading a model), so nothing
  touches a model while a job uses it.
* Large inputs (uploaded images, later training data) go to `job_inputs`, not `params`: listing the queue never
  reads them, and they are deleted when the job ends. Finished jobs beyond `keep_finished` are pruned (row,
  and `on_prune` deletes their files).
* One server per data folder: `start` takes an exclusive lock file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from booth.errors import BoothError

log = logging.getLogger("booth.server")

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_()\-.]{1,64}$")
SCHEMA_VERSION = 2  # 2: jobs.rank (a queued job moved in the run order)
PROGRESS_WRITE_INTERVAL = 1.0

MOVES = ("top", "up", "down", "bottom")
_RUN_ORDER = "priority DESC, COALESCE(rank, seq), seq"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    params TEXT NOT NULL,
    result TEXT,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress REAL NOT NULL DEFAULT 0,
    step INTEGER,
    total INTEGER,
    eta REAL,
    message TEXT,
    metrics TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    rank REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, priority, seq);
CREATE TABLE IF NOT EXISTS job_inputs (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS options (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Job:
    """One row of the queue."""

    id: str
    seq: int
    kind: str
    status: str
    params: dict[str, Any]
    priority: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    progress: float = 0.0
    step: int | None = None
    total: int | None = None
    eta: float | None = None
    message: str | None = None
    metrics: dict[str, Any] | None = None
    attempts: int = 0
    rank: float | None = None  # place in the run order within its priority (None: `seq`); set by `move`

    @property
    def order_key(self) -> tuple[int, float, int]:
        """Queued jobs run in this order: higher priority first, then by rank (or submission)."""
        return (-self.priority, self.rank if self.rank is not None else self.seq, self.seq)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        for key in ("params", "result", "error", "metrics"):
            data[key] = json.loads(data[key]) if data[key] else None
        data["params"] = data["params"] or {}
        return cls(**data)

    def to_dict(self, params: bool = True) -> dict[str, Any]:
        out = {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "priority": self.priority,
            "order": self.order_key[1],  # run order within the priority (queued jobs: ascending)
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": self.progress,
            "step": self.step,
            "total": self.total,
            "eta": self.eta,
            "message": self.message,
            "metrics": self.metrics,
            "attempts": self.attempts,
            "result": self.result,
            "error": self.error,
        }
        if params:
            out["params"] = self.params
        return out


@dataclass
class Outcome:
    """What a runner returns: `result` is stored (JSON); `response` goes only to the HTTP request waiting."""

    result: dict[str, Any] = field(default_factory=dict)
    response: Any = None


@dataclass
class Finished:
    """What a waiter receives: the final row and the runner's in-memory response (None after a restart)."""

    job: Job
    response: Any = None


class JobFailed(Exception):
    """Raised by a runner to fail its job with an HTTP status and A1111 error name."""

    def __init__(self, status_code: int, detail: str, error: str = "HTTPException"):
        super().__init__(detail)
        self.status_code, self.detail, self.error = status_code, detail, error


class JobStopped(Exception):
    """Raised by a runner when it stopped because `ctx.stop_requested` (cancel or shutdown)."""


class Runner(Protocol):
    def run(self, job: Job, ctx: JobContext) -> Outcome: ...


class JobContext:
    """The running job's side of the queue: progress reports and stop / interrupt / skip requests."""

    def __init__(self, queue: JobQueue, job: Job):
        self._queue = queue
        self.job = job
        self.cancel_requested = False
        self.shutdown_requested = False
        self.interrupt_requested = False
        self._skips = 0
        self.data: dict[str, Any] = {}  # runner scratch space (e.g. the live generation state for /progress)
        self._last_write = 0.0

    @property
    def stop_requested(self) -> bool:
        """Cancel or shutdown: the job should stop as soon as it can (its result is not wanted)."""
        return self.cancel_requested or self.shutdown_requested

    def request_skip(self) -> None:
        self._skips += 1

    def take_skip(self) -> bool:
        if self._skips:
            self._skips -= 1
            return True
        return False

    def report(self, *, force: bool = False, **fields: Any) -> None:
        """Update progress fields (progress, step, total, eta, message, metrics); persisted at most 1/s."""
        for key, value in fields.items():
            if key not in ("progress", "step", "total", "eta", "message", "metrics"):
                raise TypeError(f"unknown progress field {key!r}")
            setattr(self.job, key, value)
        now = time.monotonic()
        if force or now - self._last_write >= PROGRESS_WRITE_INTERVAL:
            self._last_write = now
            self._queue._write_progress(self.job)


class JobQueue:
    """SQLite-backed FIFO of jobs with one worker thread (see the module docstring).

    Args:
        db_path: the SQLite file (created with its folder).
        runners: kind -> runner; `submit` refuses other kinds.
        keep_finished: finished jobs kept in the history.
        max_queued: `submit` raises `QueueFull` beyond this many queued jobs.
        max_attempts: a job found "running" at startup is re-queued while its attempts are below this.
        on_prune: called with the ids of pruned jobs (to delete their files).
    """

    def __init__(
        self,
        db_path: str | Path,
        runners: dict[str, Runner],
        *,
        keep_finished: int = 500,
        max_queued: int = 1000,
        max_attempts: int = 2,
        on_prune: Callable[[list[str]], None] | None = None,
    ):
        self.db_path = Path(db_path)
        self.runners = dict(runners)
        self.keep_finished = keep_finished
        self.max_queued = max_queued
        self.max_attempts = max_attempts
        self.on_prune = on_prune
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._current: JobContext | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._paused = False
        self._lock_file = None
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._connect()

    # ------------------------------------------------------------------------------------------------
    # storage

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=10)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise BoothError(f"{self.db_path} was written by a newer booth (schema {version})")
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            if "rank" not in columns:  # a queue of schema 1: its jobs keep their order (rank NULL = seq)
                db.execute("ALTER TABLE jobs ADD COLUMN rank REAL")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise BoothError(f"cannot open the job queue {self.db_path}: {exc}") from None
        return db

    def _row(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def _write_progress(self, job: Job) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET progress=?, step=?, total=?, eta=?, message=?, metrics=? WHERE id=?",
                (
                    job.progress,
                    job.step,
                    job.total,
                    job.eta,
                    job.message,
                    json.dumps(job.metrics) if job.metrics is not None else None,
                    job.id,
                ),
            )

    # ------------------------------------------------------------------------------------------------
    # options (a small persistent key-value store next to the jobs)

    def get_options(self) -> dict[str, Any]:
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM options").fetchall()
        return {row["key"]: json.loads(row["value"]) for row in rows}

    def set_options(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key, value in values.items():
                    self._db.execute(
                        "INSERT INTO options (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, json.dumps(value)),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------------------------------------
    # client side

    def submit(
        self,
        kind: str,
        params: dict[str, Any],
        *,
        job_id: str | None = None,
        priority: int = 0,
        inputs: dict[str, Any] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[Job, asyncio.Future | None]:
        """Queue a job; with `loop`, also return a future resolved (on that loop) with `Finished`.

        `inputs` (JSON values) are stored apart from `params` and read by the runner with `inputs(job_id)`.
        """
        if kind not in self.runners:
            raise BoothError(f"unknown job kind {kind!r}; known: {', '.join(self.runners)}")
        job_id = job_id or uuid.uuid4().hex
        if not JOB_ID_RE.match(job_id):
            raise BoothError("a job id is 1-64 characters of letters, digits and _ ( ) - .")
        text = json.dumps(params)
        now = time.time()
        with self._lock:
            if self._stopping:
                raise QueueClosed("the server is shutting down")
            queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if queued >= self.max_queued:
                raise QueueFull(f"the queue is full ({queued} jobs waiting)")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "INSERT INTO jobs (id, kind, status, priority, params, created) VALUES (?, ?, 'queued', ?, ?, ?)",
                    (job_id, kind, priority, text, now),
                )
                self._db.executemany(
                    "INSERT INTO job_inputs (job_id, name, value) VALUES (?, ?, ?)",
                    [(job_id, name, json.dumps(value)) for name, value in (inputs or {}).items()],
                )
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise BoothError(f"a job with id {job_id!r} already exists") from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            job = Job(job_id, cursor.lastrowid, kind, "queued", params, priority=priority, created=now)
            future = None
            if loop is not None:
                future = loop.create_future()
                self._waiters.setdefault(job_id, []).append((loop, future))
            self._wake.notify_all()
        return job, future

    def inputs(self, job_id: str) -> dict[str, Any]:
        """The large inputs stored with a job (empty once it has ended)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, value FROM job_inputs WHERE job_id = ?", (job_id,)
            ).fetchall()
        return {row["name"]: json.loads(row["value"]) for row in rows}

    def wait(self, job_id: str, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """A future resolved with `Finished` when the job ends (at once if it already has)."""
        future = loop.create_future()
        with self._lock:
            job = self._row(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.status in FINAL:
                future.set_result(Finished(job))
            else:
                self._waiters.setdefault(job_id, []).append((loop, future))
        return future

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._row(job_id) if JOB_ID_RE.match(job_id or "") else None
            current = self._current
            if job is not None and current is not None and current.job.id == job.id:
                return _merge_live(job, current.job)
            return job

    def list(self, status: str | None = None, limit: int = 100, kind: str | None = None) -> list[Job]:
        """Jobs, queued ones in run order first, then running, then the most recent finished ones."""
        sql = "SELECT * FROM jobs"
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += (
            " ORDER BY CASE status WHEN 'running' THEN 0 WHEN 'queued' THEN 1 ELSE 2 END,"
            " CASE WHEN status IN ('queued', 'running') THEN -priority ELSE 0 END,"
            " CASE WHEN status IN ('queued', 'running') THEN COALESCE(rank, seq) ELSE -seq END, seq LIMIT ?"
        )
        args.append(max(1, min(int(limit), 10_000)))
        with self._lock:
            jobs = [Job.from_row(r) for r in self._db.execute(sql, args).fetchall()]
            current = self._current
        if current is not None:
            jobs = [_merge_live(j, current.job) if j.id == current.job.id else j for j in jobs]
        return jobs

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        out.update({row["status"]: row["n"] for row in rows})
        return out

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, or ask the running one to stop; None if unknown. Finished: unchanged."""
        with self._lock:
            job = self._row(job_id) if JOB_ID_RE.match(job_id or "") else None
            if job is None:
                return None
            if job.status == "queued":
                now = time.time()
                self._db.execute(
                    "UPDATE jobs SET status='cancelled', finished=? WHERE id=? AND status='queued'",
                    (now, job_id),
                )
                self._db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
                job.status, job.finished = "cancelled", now
                self._resolve(Finished(job))
                self._prune()
                return job
            current = self._current
            if job.status == "running" and current is not None and current.job.id == job_id:
                current.cancel_requested = True
                return _merge_live(job, current.job)
            return job

    def move(self, job_id: str, to: str) -> Job | None:
        """Move a queued job in the run order: "top" (it runs next), "bottom", "up" or "down" one place. The job
        takes the priority of the place it lands in. None if there is no such job; BoothError if it is not
        queued or `to` is not one of those."""
        if to not in MOVES:
            raise BoothError(f"'to' must be one of {', '.join(MOVES)}, got {to!r}")
        with self._lock:
            job = self._row(job_id) if JOB_ID_RE.match(job_id or "") else None
            if job is None:
                return None
            if job.status != "queued":
                raise BoothError(f"job {job_id} is {job.status}: only a queued job moves")
            rows = self._db.execute(f"SELECT * FROM jobs WHERE status = 'queued' ORDER BY {_RUN_ORDER}")
            order = [Job.from_row(row) for row in rows]
            at = [j.id for j in order].index(job_id)
            others = order[:at] + order[at + 1 :]
            place = {"top": 0, "bottom": len(others), "up": max(0, at - 1), "down": min(len(others), at + 1)}[
                to
            ]
            before = others[place - 1] if place > 0 else None
            after = others[place] if place < len(others) else None
            if after is not None:
                job.priority = after.priority
                same = before is not None and before.priority == after.priority
                job.rank = (before.order_key[1] + after.order_key[1]) / 2 if same else after.order_key[1] - 1
            elif before is not None:
                job.priority, job.rank = before.priority, before.order_key[1] + 1
            self._db.execute(
                "UPDATE jobs SET priority = ?, rank = ? WHERE id = ? AND status = 'queued'",
                (job.priority, job.rank, job_id),
            )
            return job

    def current(self) -> JobContext | None:
        """The running job's context (None when idle)."""
        return self._current

    def interrupt_current(self) -> JobContext | None:
        ctx = self._current
        if ctx is not None:
            ctx.interrupt_requested = True
        return ctx

    def skip_current(self) -> JobContext | None:
        ctx = self._current
        if ctx is not None:
            ctx.request_skip()
        return ctx

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop taking new jobs (the running one finishes)."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._wake.notify_all()

    def call_in_worker(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the worker thread between jobs (before the next queued job); returns its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                future.set_exception(QueueClosed("the queue worker is not running"))
                return future
            self._calls.append((fn, future))
            self._wake.notify_all()
        return future

    # ------------------------------------------------------------------------------------------------
    # worker

    def start(self, paused: bool = False) -> None:
        """Take the data-folder lock, recover interrupted jobs, start the worker thread."""
        self._take_lock_file()
        self._paused = paused
        self._stopping = False
        self._recover()
        self._thread = threading.Thread(target=self._work, name="booth-queue-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker: the running job is asked to stop and goes back to the queue; waiters get 503."""
        with self._lock:
            self._stopping = True
            if self._current is not None:
                self._current.shutdown_requested = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the queue worker did not stop within %.0f s", timeout)
        self._thread = None
        with self._lock:
            for _, future in self._calls:
                future.set_exception(QueueClosed("the server is shutting down"))
            self._calls.clear()
            waiters, self._waiters = self._waiters, {}
        for job_id, items in waiters.items():
            with self._lock:
                job = self._row(job_id)
            for loop, future in items:
                _resolve_future(loop, future, Finished(job) if job else None)
        self._release_lock_file()

    def close(self) -> None:
        if self._thread is not None:
            self.stop()
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def check_free(self) -> None:
        """BoothError if another server holds this data folder (checked before binding a port)."""
        self._take_lock_file()
        self._release_lock_file()

    def _take_lock_file(self) -> None:
        path = self.db_path.with_suffix(".lock")
        handle = open(path, "a+")  # noqa: SIM115 - held until stop()
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no advisory locks on this platform
        except OSError:
            handle.close()
            raise BoothError(
                f"another booth server is using {self.db_path.parent}; use a different --data-dir"
            ) from None
        self._lock_file = handle

    def _release_lock_file(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def _recover(self) -> None:
        with self._lock:
            stale = self._db.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall()
            for row in stale:
                job = Job.from_row(row)
                if job.attempts < self.max_attempts:
                    self._db.execute(
                        "UPDATE jobs SET status='queued', started=NULL, progress=0, message=? WHERE id=?",
                        ("re-queued after a server restart", job.id),
                    )
                else:
                    error = {
                        "error": "ServerRestart",
                        "detail": f"the server stopped during this job {job.attempts} times; not retried",
                        "status_code": 500,
                    }
                    self._db.execute(
                        "UPDATE jobs SET status='failed', finished=?, error=? WHERE id=?",
                        (time.time(), json.dumps(error), job.id),
                    )
                    self._db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job.id,))

    def _claim(self) -> JobContext | None:
        with self._lock:
            if self._paused or self._stopping:
                return None
            row = self._db.execute(
                f"SELECT * FROM jobs WHERE status = 'queued' ORDER BY {_RUN_ORDER} LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            job.status, job.started, job.attempts = "running", time.time(), job.attempts + 1
            job.progress, job.message = 0.0, None
            self._db.execute(
                "UPDATE jobs SET status='running', started=?, attempts=?, progress=0, message=NULL WHERE id=?",
                (job.started, job.attempts, job.id),
            )
            self._current = JobContext(self, job)
            return self._current

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._calls and (self._paused or not self._has_queued()):
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
                calls, self._calls = self._calls, []
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        future.set_exception(exc)
            ctx = self._claim()
            if ctx is not None:
                self._run(ctx)

    def _has_queued(self) -> bool:
        return self._db.execute("SELECT 1 FROM jobs WHERE status = 'queued' LIMIT 1").fetchone() is not None

    def _run(self, ctx: JobContext) -> None:
        job = ctx.job
        outcome, status, error = None, "done", None
        try:
            outcome = self.runners[job.kind].run(job, ctx)
            if ctx.shutdown_requested:
                status = "requeue"
            elif ctx.cancel_requested:
                status = "cancelled"
        except JobStopped:
            status = "requeue" if ctx.shutdown_requested and not ctx.cancel_requested else "cancelled"
        except JobFailed as exc:
            status, error = (
                "failed",
                {"error": exc.error, "detail": exc.detail, "status_code": exc.status_code},
            )
        except BoothError as exc:
            status, error = "failed", {"error": type(exc).__name__, "detail": str(exc), "status_code": 400}
        except Exception as exc:  # noqa: BLE001 - a bug or the environment (out of memory ...): logged
            log.error("job %s (%s) failed", job.id, job.kind, exc_info=exc)
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip(": ")
            status, error = "failed", {"error": type(exc).__name__, "detail": detail, "status_code": 500}
        self._finish(ctx, status, outcome, error)

    def _finish(self, ctx: JobContext, status: str, outcome: Outcome | None, error: dict | None) -> None:
        job = ctx.job
        with self._lock:
            self._current = None
            if status == "requeue":
                self._db.execute(
                    "UPDATE jobs SET status='queued', started=NULL, progress=0, attempts=MAX(attempts-1, 0),"
                    " message=? WHERE id=?",
                    ("re-queued: the server stopped during this job", job.id),
                )
                return
            job.status, job.finished, job.error = status, time.time(), error
            job.result = outcome.result if outcome is not None and status == "done" else None
            if status == "done":
                job.progress = 1.0
            self._db.execute(
                "UPDATE jobs SET status=?, finished=?, result=?, error=?, progress=?, step=?, total=?,"
                " eta=NULL, message=?, metrics=? WHERE id=?",
                (
                    job.status,
                    job.finished,
                    json.dumps(job.result) if job.result is not None else None,
                    json.dumps(error) if error is not None else None,
                    job.progress,
                    job.step,
                    job.total,
                    job.message,
                    json.dumps(job.metrics) if job.metrics is not None else None,
                    job.id,
                ),
            )
            self._db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job.id,))
            job.eta = None
            self._resolve(
                Finished(job, outcome.response if outcome is not None and status == "done" else None)
            )
            self._prune()

    def _resolve(self, finished: Finished) -> None:
        for loop, future in self._waiters.pop(finished.job.id, []):
            _resolve_future(loop, future, finished)

    def _prune(self) -> None:
        rows = self._db.execute(
            "SELECT id FROM jobs WHERE status IN ('done', 'failed', 'cancelled') ORDER BY seq DESC LIMIT -1 OFFSET ?",
            (self.keep_finished,),
        ).fetchall()
        if not rows:
            return
        ids = [row["id"] for row in rows]
        self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        self._db.executemany("DELETE FROM job_inputs WHERE job_id = ?", [(i,) for i in ids])
        if self.on_prune is not None:
            try:
                self.on_prune(ids)
            except Exception as exc:  # noqa: BLE001 - pruning files must not fail a job
                log.warning("pruning job files failed: %s", exc)


class QueueFull(BoothError):
    """More jobs are queued than the server accepts."""


class QueueClosed(BoothError):
    """The queue is stopping or not running."""


def _merge_live(stored: Job, live: Job) -> Job:
    for key in ("status", "started", "progress", "step", "total", "eta", "message", "metrics", "attempts"):
        setattr(stored, key, getattr(live, key))
    return stored


def _resolve_future(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: Any) -> None:
    def setter():
        if not future.done():
            future.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(setter)


__all__ = [
    "FINAL",
    "JOB_ID_RE",
    "STATUSES",
    "Finished",
    "Job",
    "JobContext",
    "JobFailed",
    "JobQueue",
    "JobStopped",
    "Outcome",
    "QueueClosed",
    "QueueFull",
    "Runner",
]
