import asyncio
import threading

import pytest

from resmemnet.serve.batching import BatcherClosedError, MicroBatcher, QueueFullError


class GatedDouble:
    """Doubles numbers; the first call waits for `gate`, so later requests pile up behind it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        if len(self.calls) == 1 and not self.gate.wait(timeout=10):
            raise TimeoutError("gate never opened")
        return [2 * x for x in items]

    def wait_for_first_call(self) -> None:
        while not self.calls:
            threading.Event().wait(0.001)


def test_waiting_requests_are_merged_and_each_gets_its_own_results():
    fn = GatedDouble()
    batcher = MicroBatcher(fn, max_batch=100, max_wait_s=0)
    first = batcher.submit([0])
    fn.wait_for_first_call()
    later = [batcher.submit([i, 10 * i]) for i in range(1, 6)]
    fn.gate.set()
    assert first.result(timeout=10) == [0]
    assert [f.result(timeout=10) for f in later] == [[2 * i, 20 * i] for i in range(1, 6)]
    assert fn.calls == [[0], [1, 10, 2, 20, 3, 30, 4, 40, 5, 50]]
    assert list(batcher.batch_sizes) == [1, 10]
    batcher.close()


def test_batches_stop_growing_at_max_batch():
    fn = GatedDouble()
    batcher = MicroBatcher(fn, max_batch=4, max_wait_s=0)
    futures = [batcher.submit([0])]
    fn.wait_for_first_call()
    futures += [batcher.submit([i]) for i in range(1, 9)]
    fn.gate.set()
    assert [f.result(timeout=10) for f in futures] == [[2 * i] for i in range(9)]
    assert list(batcher.batch_sizes) == [1, 4, 4]
    batcher.close()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    calls = []

    def fn(items: list[int]) -> list[int]:
        calls.append(items)
        if -1 in items:
            raise ValueError("bad item -1")
        return items[:-1] if 99 in items else items

    batcher = MicroBatcher(fn, max_wait_s=0)
    with pytest.raises(ValueError, match="bad item -1"):
        batcher.submit([-1]).result(timeout=10)
    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        batcher.submit([1, 99]).result(timeout=10)
    assert batcher.submit([7]).result(timeout=10) == [7]
    batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher.submit([1])


def test_queue_limit_refuses_new_work_instead_of_growing():
    fn = GatedDouble()
    batcher = MicroBatcher(fn, max_batch=2, max_wait_s=0, max_queue=3)
    running = batcher.submit([1])
    fn.wait_for_first_call()
    waiting = batcher.submit([2, 3, 4])
    with pytest.raises(QueueFullError, match="3 images are already waiting"):
        batcher.submit([5])
    fn.gate.set()
    assert running.result(timeout=10) == [2] and waiting.result(timeout=10) == [4, 6, 8]
    batcher.close()


def test_the_event_loop_keeps_running_while_the_model_works():
    # The batch function blocks until a coroutine on the loop opens the gate: a blocked loop would time out.
    fn = GatedDouble()
    batcher = MicroBatcher(fn, max_wait_s=0)

    async def scenario() -> list[int]:
        pending = asyncio.ensure_future(batcher.run([21]))
        while not fn.calls:  # the loop itself must keep turning while the worker holds the batch
            await asyncio.sleep(0.001)
        assert not pending.done()
        fn.gate.set()
        return await asyncio.wait_for(pending, timeout=10)

    assert asyncio.run(scenario()) == [42]
    assert asyncio.run(batcher.run([])) == []
    batcher.close()


def test_invalid_settings_are_named():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda x: x, max_batch=0)


def test_on_idle_runs_once_a_burst_is_over_not_between_its_batches():
    fn = GatedDouble()
    idle: list[int] = []
    batcher = MicroBatcher(fn, max_batch=2, max_wait_s=0, on_idle=lambda: idle.append(len(fn.calls)))
    first = batcher.submit([1])
    fn.wait_for_first_call()
    rest = [batcher.submit([i]) for i in range(2, 6)]  # queued while the first batch runs: one burst
    fn.gate.set()
    assert [f.result(timeout=10) for f in (first, *rest)] == [[2], [4], [6], [8], [10]]
    batcher.close()
    assert len(fn.calls) >= 3 and idle == [len(fn.calls)]  # once, after the burst's last batch
