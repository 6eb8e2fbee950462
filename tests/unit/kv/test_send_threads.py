"""Sending threads are reused across transfers, run concurrent jobs side by side, and retire when idle."""

from __future__ import annotations

import threading
import time

from workers.kv.sending import SendThreads


def _run(pool: SendThreads, job_s: float = 0.0) -> tuple[threading.Event, list[int]]:
    done, ident = threading.Event(), []

    def job() -> None:
        ident.append(threading.get_ident())
        time.sleep(job_s)
        done.set()

    pool.submit(job)
    return done, ident


def test_sequential_jobs_reuse_one_thread() -> None:
    pool = SendThreads(idle_s=5.0)
    idents = []
    for _ in range(5):
        done, ident = _run(pool)
        assert done.wait(5)
        idents += ident
        time.sleep(0.01)  # the thread is back to waiting before the next job comes
    assert len(set(idents)) == 1


def test_concurrent_jobs_each_get_a_thread() -> None:
    pool = SendThreads(idle_s=5.0)
    gate = threading.Barrier(3, timeout=2)
    results: list[str] = []
    finished = threading.Semaphore(0)

    def job() -> None:  # passes the barrier only if all three jobs run at once
        try:
            gate.wait()
            results.append("met")
        except threading.BrokenBarrierError:
            results.append("alone")
        finished.release()

    for _ in range(3):
        pool.submit(job)
    for _ in range(3):
        assert finished.acquire(timeout=5)
    assert results == ["met"] * 3


def test_idle_threads_exit_and_later_jobs_still_run() -> None:
    pool = SendThreads(idle_s=0.05)
    done, first = _run(pool)
    assert done.wait(5)
    time.sleep(0.3)
    assert not any(t.ident == first[0] and t.is_alive() for t in threading.enumerate())
    done, _ = _run(pool)
    assert done.wait(5)
