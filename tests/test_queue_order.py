"""Moving queued jobs (A1111's most asked-for missing feature is a queue one can manage, a1111.md §16):
`JobQueue.move` top / up / down / bottom across priorities, what the worker then runs, a schema-1 queue
migrated in place, `POST /booth/v1/jobs/{id}/move` and its `moved` event."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from booth.errors import BoothError
from booth.server.events import job_events
from booth.server.queue import JobQueue


class Recorder:
    def __init__(self):
        self.ran = []
        self.done = threading.Event()

    def run(self, job, ctx):
        from booth.server.queue import Outcome

        self.ran.append(job.params["n"])
        if len(self.ran) == job.params["last"]:
            self.done.set()
        return Outcome({})


def order(queue):
    return [job.params["n"] for job in queue.list(status="queued")]


def test_moves_reorder_the_queue_and_the_worker_runs_that_order(tmp_path):
    runner = Recorder()
    queue = JobQueue(tmp_path / "q.sqlite3", {"t": runner})
    ids = {}
    for n, priority in ((1, 0), (2, 0), (3, 5), (4, 0), (5, 0)):
        ids[n] = queue.submit("t", {"n": n, "last": 4}, priority=priority)[0].id  # one is cancelled
    assert order(queue) == [3, 1, 2, 4, 5]  # priority first, then submission
    moved = queue.move(ids[5], "top")
    assert moved.priority == 5 and order(queue) == [5, 3, 1, 2, 4]  # it takes the priority of its new place
    queue.move(ids[2], "up")
    assert order(queue) == [5, 3, 2, 1, 4]
    queue.move(ids[3], "down")
    assert order(queue) == [5, 2, 3, 1, 4] and queue.get(ids[3]).priority == 0  # it left the top group
    queue.move(ids[5], "bottom")
    assert order(queue) == [2, 3, 1, 4, 5] and queue.get(ids[5]).priority == 0
    queue.move(ids[2], "up")  # already first: stays
    queue.move(ids[5], "down")  # already last: stays
    assert order(queue) == [2, 3, 1, 4, 5]
    for _ in range(20):  # many moves between the same two neighbours keep a strict order
        queue.move(ids[4], "up")
        queue.move(ids[4], "down")
    assert order(queue) == [2, 3, 1, 4, 5]

    with pytest.raises(BoothError, match="'to' must be one of top, up, down, bottom"):
        queue.move(ids[1], "sideways")
    assert queue.move("nope", "top") is None
    queue.cancel(ids[1])
    with pytest.raises(BoothError, match="is cancelled: only a queued job moves"):
        queue.move(ids[1], "top")
    queue.start()
    try:
        assert runner.done.wait(30)
    finally:
        queue.close()
    assert runner.ran == [2, 3, 4, 5]


def test_a_queue_of_schema_1_gains_the_rank_column_and_keeps_its_order(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
            status TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, params TEXT NOT NULL, result TEXT,
            error TEXT, created REAL NOT NULL, started REAL, finished REAL, progress REAL NOT NULL DEFAULT 0,
            step INTEGER, total INTEGER, eta REAL, message TEXT, metrics TEXT, attempts INTEGER NOT NULL DEFAULT 0);
        INSERT INTO jobs (id, kind, status, params, created) VALUES ('a', 't', 'queued', '{"n": 1}', 1);
        INSERT INTO jobs (id, kind, status, params, created) VALUES ('b', 't', 'queued', '{"n": 2}', 2);
        PRAGMA user_version=1;
        """
    )
    db.close()
    queue = JobQueue(path, {"t": Recorder()})
    try:
        assert order(queue) == [1, 2]
        queue.move("b", "top")
        assert order(queue) == [2, 1]
        assert queue._db.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        queue.close()


def test_a_moved_job_is_an_event():
    before = {"j": {"status": "queued", "priority": 0, "order": 7.0}}
    assert job_events(before, {"j": {"status": "queued", "priority": 0, "order": 7.0}}) == []
    moved = {"status": "queued", "priority": 3, "order": 2.5}
    assert job_events(before, {"j": moved}) == [("moved", moved)]


def test_the_api_moves_a_queued_job(tmp_path, tiny_sd1_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from booth.server.app import create_app
    from booth.server.config import ServerConfig

    config = ServerConfig(model=str(tiny_sd1_dir), data_dir=tmp_path / "data", start_paused=True)
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        body = {"kind": "txt2img", "params": {"steps": 1, "width": 32, "height": 32}}
        ids = [client.post("/booth/v1/jobs", json=body).json()["job"]["id"] for _ in range(3)]
        response = client.post(f"/booth/v1/jobs/{ids[2]}/move", json={"to": "top"})
        assert response.status_code == 200 and response.json()["job"]["id"] == ids[2]
        queued = client.get("/booth/v1/queue?status=queued").json()["jobs"]
        assert [j["id"] for j in queued] == [ids[2], ids[0], ids[1]]
        assert queued[0]["order"] < queued[1]["order"] < queued[2]["order"]
        for path, body, status, message in [
            (f"/booth/v1/jobs/{ids[0]}/move", {"to": "left"}, 422, "to must be one of top, up, down, bottom"),
            (f"/booth/v1/jobs/{ids[0]}/move", {"to": "top", "x": 1}, 422, ""),
            ("/booth/v1/jobs/nope/move", {"to": "top"}, 404, "job not found"),
        ]:
            r = client.post(path, json=body)
            assert r.status_code == status and message in r.text, r.text
        client.post(f"/booth/v1/jobs/{ids[0]}/cancel")
        r = client.post(f"/booth/v1/jobs/{ids[0]}/move", json={"to": "top"})
        assert r.status_code == 409 and "only a queued job moves" in r.text
