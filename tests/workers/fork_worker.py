"""Worker for the fork tests: a client created before fork() is used in the children.

Usage: fork_worker.py SCENARIO QUEUE_DIR BASE_URL

Every process prints JSON lines {"who": ..., "ids": [...], ...}; the parent's last line has
"done": true. Scenarios:

- raw:       os.fork(); child and parent both track and flush; the parent keeps working
             after the child exits (its connection was not closed by the child).
- busy-lock: fork while the parent's flusher is inside a slow POST holding the flush lock;
             the child must not ship meanwhile (flush(0.5) is False), then ships once the
             parent lets go.
- storm:     a thread tracks non-stop while the main thread forks 8 children that track and
             flush: fork lands inside open transactions.
- pool:      multiprocessing.get_context("fork").Pool(3) tracking through the parent's client.
- process:   multiprocessing fork Process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from durable_analytics import Analytics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for queue_contents
from queue_contents import quick_checks

client: Analytics


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def track(label: str, count: int) -> list[str]:
    return [client.track("u", label, {"pid": os.getpid(), "n": n}) for n in range(count)]


def quick_check(directory: str) -> str:
    """ "ok" when every queue file of ``directory`` passes quick_check, else the first verdict."""
    verdicts = [v for v in quick_checks(Path(directory)) if v != "ok"]
    return verdicts[0] if verdicts else "ok"


def in_child(body: Any) -> None:
    """Run ``body`` in a forked child and leave with os._exit, never back into the caller."""
    code = 1
    try:
        body()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def raw(directory: str) -> None:
    pre = track("pre", 5)
    assert client.flush(10)
    pid = os.fork()
    if pid == 0:

        def child() -> None:
            ids = track("child", 5)
            emit(who="child", ids=ids, flushed=client.flush(10), pid=os.getpid())
            client.shutdown()

        in_child(child)
    ids = track("parent", 5)
    flushed = client.flush(10)
    _, status = os.waitpid(pid, 0)
    post = track("post", 5)
    emit(
        who="parent",
        ids=pre + ids + post,
        flushed=flushed and client.flush(10),
        child_status=status,
        quick_check=quick_check(directory),
        done=True,
    )


def busy_lock(directory: str) -> None:
    pre = track("pre", 5)
    assert client.flush(0.3) is False  # the flusher is now inside the slow POST
    pid = os.fork()
    if pid == 0:

        def child() -> None:
            ids = track("child", 3)
            early = client.flush(0.5)  # the parent still holds the flush lock
            late = client.flush(20)
            emit(who="child", ids=ids, early=early, late=late)

        in_child(child)
    _, status = os.waitpid(pid, 0)
    emit(
        who="parent",
        ids=pre,
        flushed=client.flush(10),
        child_status=status,
        quick_check=quick_check(directory),
        done=True,
    )


def storm(directory: str) -> None:
    stop = threading.Event()
    hammered: list[str] = []

    def hammer() -> None:
        n = 0
        while not stop.is_set():
            hammered.append(client.track("u", "hammer", {"n": n}))
            n += 1

    thread = threading.Thread(target=hammer)
    thread.start()
    children = []
    for _ in range(8):
        time.sleep(0.02)
        pid = os.fork()
        if pid == 0:

            def child() -> None:
                ids = track("child", 3)
                flushed = client.flush(20)
                emit(who="child", ids=ids, flushed=flushed)
                if not flushed:
                    raise RuntimeError("child could not flush")

            in_child(child)
        children.append(pid)
    stop.set()
    thread.join()
    statuses = [os.waitpid(pid, 0)[1] for pid in children]
    emit(
        who="parent",
        ids=hammered,
        flushed=client.flush(20),
        child_status=max(statuses),
        quick_check=quick_check(directory),
        done=True,
    )


def pool_task(n: int) -> tuple[str, int, bool | None]:
    mid = client.track("u", "pool", {"n": n})
    flushed = client.flush(10) if n % 10 == 0 else None  # the child's own flusher works
    return mid, os.getpid(), flushed


def process_task() -> None:
    ids = track("process", 3)
    emit(who="child", ids=ids, flushed=client.flush(10))


def pool(directory: str) -> None:
    context = multiprocessing.get_context("fork")
    workers = context.Pool(3)
    results = workers.map(pool_task, range(30), chunksize=1)
    workers.close()
    workers.join()
    emit(
        who="parent",
        ids=[mid for mid, _, _ in results],
        pids=sorted({pid for _, pid, _ in results}),
        child_flushes=[ok for _, _, ok in results if ok is not None],
        flushed=client.flush(15),
        child_status=0,
        quick_check=quick_check(directory),
        done=True,
    )


def process(directory: str) -> None:
    context = multiprocessing.get_context("fork")
    pre = track("pre", 2)
    child = context.Process(target=process_task)
    child.start()
    child.join(30)
    emit(
        who="parent",
        ids=pre + track("post", 2),
        flushed=client.flush(15),
        child_status=child.exitcode,
        quick_check=quick_check(directory),
        done=True,
    )


SCENARIOS = {
    "raw": raw,
    "busy-lock": busy_lock,
    "storm": storm,
    "pool": pool,
    "process": process,
}


def main() -> None:
    global client
    scenario, directory, url = sys.argv[1:4]
    client = Analytics(
        app_id="fork-app",
        persistence_dir=directory,
        base_url=url,
        flush_interval=0.1,
        flush_threshold=1000,
        retry_base_delay=0.01,
        retry_max_delay=0.05,
    )
    SCENARIOS[scenario](directory)


if __name__ == "__main__":
    main()
