"""Defects a review of session 32's changes found (review32).

1. ``ReadyQueue.close()`` takes back the jobs handed to workers that have not returned them
   (fix32): it went through a ``weakref.WeakSet`` of every worker's waiter, whose iteration is
   Python code. On the compiled core, whose steps hold no lock but the GIL, a worker starting
   meanwhile (``run_worker`` enlists its waiter first: a replacement worker, one of a pool still
   starting) or a ``pop()`` that waits added to the set while close() iterated it: close() raised
   ``RuntimeError: Set changed size during iteration`` half done (closed, its idle workers never
   woken, so ``stop()`` waited for them for good).
"""
import sys
import threading

import pytest

from _helpers import WAIT


def test_close_while_workers_enlist_completes(core):
    """Workers enlisting as the queue closes (each thread's first step in run_worker) never make
    close() fail: it completes, and the idle worker waiting in pop() is woken by it."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch often: the enlisting threads run inside close()
    try:
        for _ in range(20):
            ready = core.ReadyQueue(10)
            kept = [core._Waiter() for _ in range(3000)]  # the waiters of a big pool: a long iteration
            for waiter in kept:
                ready.enlist(waiter)
            popped = []
            idle = threading.Thread(target=lambda: popped.append(ready.pop()), daemon=True)
            idle.start()
            done = threading.Event()

            def enlisting():
                while not done.is_set():
                    ready.enlist(core._Waiter())  # as each worker thread starting does

            starters = [threading.Thread(target=enlisting, daemon=True) for _ in range(2)]
            for starter in starters:
                starter.start()
            try:
                ready.close()
            finally:
                done.set()
                for starter in starters:
                    starter.join(WAIT)
            idle.join(WAIT)
            assert not idle.is_alive(), "close() did not wake the worker waiting in pop()"
            assert popped == [None]
    finally:
        sys.setswitchinterval(switch_interval)
