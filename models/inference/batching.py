"""Batching across callers: several threads' ``run()`` calls become one call of the backend.

A GPU runs a batch of 8 lesion crops in about the time of one, so a worker
that handles several studies at once (``worker_concurrency``) keeps it busy
only if their calls are gathered. :class:`BatchingBackend` wraps any
:class:`~models.inference.backend.Backend`: a call joins the items waiting,
and the first of them (the leader) waits until ``max_batch`` rows are there
or ``max_wait_s`` has passed since it arrived, whichever comes first, then
concatenates the items on axis 0, runs the graph once and hands each caller
its own rows. Callers block for their own result; an error of the run is
raised to every caller whose items were in it.

No thread of its own: the leader gathers and runs, and when it takes its
batch it hands the lead to the oldest item left, so nothing waits for a
batch that nobody forms. Items whose inputs differ in any non-batch
dimension (mammograms of other sizes) are run as separate calls.

A graph may fix its batch inside (a ``Reshape`` to ``[1, -1]``, a statistic
over axis 0) although its inputs say otherwise: :func:`batch_inconsistency`
runs a batch beside the same items one at a time on the serving backend,
and a graph that fails it is wrapped with ``batchable=False`` (one call per
item, as without batching).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from models.errors import BackendUnavailable
from models.inference.backend import Arrays, Backend

Signature = tuple[tuple[str, tuple[int, ...], str], ...]

#: Largest difference between a batched and an unbatched output, relative to the output's scale (at least 1),
#: still taken for the same result: fp16 graphs differ by an ulp or two between batch sizes (6e-5 measured for
#: CLDLR on ONNX Runtime's CPU provider); a graph that mixes items differs by the size of its outputs.
BATCH_TOLERANCE = 1e-2


@dataclass
class _Request:
    inputs: dict[str, npt.NDArray[np.float32]]
    rows: int
    signature: Signature
    arrived: float
    outputs: Arrays | None = None
    error: BaseException | None = None
    done: bool = False
    batch: list[_Request] = field(default_factory=list)  # what the leader took (set on the leader only)


def _rows(inputs: Mapping[str, npt.NDArray[np.float32]]) -> int:
    leading = {int(np.shape(value)[0]) if np.ndim(value) else -1 for value in inputs.values()}
    if len(leading) != 1 or -1 in leading:
        raise ValueError(f"every input needs the same leading (batch) dimension; got {sorted(leading)}")
    return leading.pop()


def _signature(inputs: Mapping[str, npt.NDArray[np.float32]]) -> Signature:
    return tuple(
        (name, tuple(int(d) for d in np.shape(value)[1:]), str(np.asarray(value).dtype))
        for name, value in sorted(inputs.items())
    )


class BatchingBackend:
    """A :class:`~models.inference.backend.Backend` that gathers concurrent calls into batches.

    Parameters
    ----------
    backend
        What runs the batches; its graph needs a symbolic batch axis
        (:func:`models.inference.batch_axis.with_symbolic_batch`) and must be
        safe to call from two threads at once (ONNX Runtime sessions are;
        :class:`~models.inference.tensorrt_backend.TensorRTBackend` holds a lock).
    max_batch
        The most rows (items' leading dimensions added up) run in one call.
        A call with more rows than this runs alone, as given.
    max_wait_s
        How long the oldest waiting item waits for more before its batch runs anyway.
    batchable
        False: every call goes straight to ``backend``, one at a time as it
        comes (for a graph :func:`batch_inconsistency` refused).
    clock
        Monotonic seconds; replaceable in tests.

    Raises
    ------
    ValueError
        ``max_batch`` below 1 or ``max_wait_s`` below 0.
    """

    def __init__(
        self,
        backend: Backend,
        max_batch: int,
        max_wait_s: float,
        *,
        batchable: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1: {max_batch!r}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0: {max_wait_s!r}")
        self._backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batchable = batchable and max_batch > 1
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._leader: _Request | None = None

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._backend.output_names

    @property
    def backend(self) -> Backend:
        """The wrapped backend."""
        return self._backend

    @property
    def waiting(self) -> int:
        """Items queued for the next batch (for tests and status)."""
        with self._cond:
            return len(self._pending)

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        """Run ``inputs`` (one or more rows) in a batch with whatever other callers send meanwhile.

        Raises
        ------
        ValueError
            The inputs do not share one leading dimension.
        Exception
            Whatever the wrapped backend raised for the batch this call was in.
        """
        if not self.batchable:
            return self._backend.run(inputs)
        request = _Request(dict(inputs), _rows(inputs), _signature(inputs), self._clock())
        if request.rows > self.max_batch:
            return self._backend.run(inputs)
        with self._cond:
            self._pending.append(request)
            if self._leader is None:
                self._leader = request
            self._cond.notify_all()
            while not request.done and self._leader is not request:
                self._cond.wait()
            if self._leader is request:
                self._gather(request)
        if request.batch:
            self._execute(request.batch)
        with self._cond:
            while not request.done:  # a follower whose batch another thread runs
                self._cond.wait()
        if request.error is not None:
            raise request.error
        assert request.outputs is not None
        return request.outputs

    def _rows_waiting(self) -> int:
        return sum(r.rows for r in self._pending)

    def _gather(self, leader: _Request) -> None:
        """Wait (lock held) for a full batch or the leader's deadline, take the batch, pass the lead on."""
        deadline = leader.arrived + self.max_wait_s
        while self._rows_waiting() < self.max_batch:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        taken: list[_Request] = []
        rows = 0
        while self._pending and (not taken or rows + self._pending[0].rows <= self.max_batch):
            item = self._pending.popleft()
            taken.append(item)
            rows += item.rows
        leader.batch = taken
        self._leader = self._pending[0] if self._pending else None
        self._cond.notify_all()

    def _execute(self, batch: list[_Request]) -> None:
        """Run the batch (lock not held): one backend call per input signature; settle every request."""
        try:
            groups: dict[Signature, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.signature, []).append(request)
            for group in groups.values():
                self._run_group(group)
        except BaseException as exc:  # never leave a caller waiting for ever
            for request in batch:
                if request.outputs is None and request.error is None:
                    request.error = exc
            raise
        finally:
            with self._cond:
                for request in batch:
                    request.done = True
                self._cond.notify_all()

    def _run_group(self, group: Sequence[_Request]) -> None:
        try:
            if len(group) == 1:
                group[0].outputs = self._backend.run(group[0].inputs)
                return
            names = list(group[0].inputs)
            outputs = self._backend.run({name: np.concatenate([r.inputs[name] for r in group]) for name in names})
            total = sum(r.rows for r in group)
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != total:
                    raise BackendUnavailable(
                        f"output {name} has shape {value.shape} for a batch of {total} rows: the graph does not batch"
                    )
            bounds = list(itertools.accumulate(r.rows for r in group))
            for request, end in zip(group, bounds, strict=True):
                start = end - request.rows
                request.outputs = {name: value[start:end] for name, value in outputs.items()}
        except Exception as exc:
            for request in group:
                request.error = exc


def batch_inconsistency(
    backend: Backend,
    shapes: Mapping[str, Sequence[int | None]],
    rows: int = 2,
    free_size: int = 64,
    seed: int = 0,
) -> str | None:
    """Why ``backend`` cannot batch its graph, or None when it can.

    ``rows`` random items are run one at a time and then as one batch on
    the same backend; the batch must give each item's outputs, in order and
    shape, within :data:`BATCH_TOLERANCE` of the output's scale.

    Parameters
    ----------
    backend
        The backend that will serve the graph (its graph with a symbolic batch axis).
    shapes
        Each input's shape (:func:`models.inference.batch_axis.input_shapes`); the leading dimension is the batch,
        and any other unknown dimension is given ``free_size``.
    rows
        Items in the trial batch.
    free_size
        Size given to unknown non-batch dimensions (64 is a multiple of every stride the bundled graphs use).
    seed
        Seeds the random items, so a refusal is repeatable.

    Returns
    -------
    str or None
        A sentence for the log, or None.
    """
    generator = np.random.default_rng(seed)
    items: list[dict[str, npt.NDArray[np.float32]]] = []
    for _ in range(rows):
        item: dict[str, npt.NDArray[np.float32]] = {}
        for name, shape in shapes.items():
            if len(shape) == 0:
                return f"input {name} is a scalar: it has no batch axis"
            dims = (1, *(free_size if d is None else int(d) for d in shape[1:]))
            item[name] = generator.standard_normal(dims).astype(np.float32)
        items.append(item)
    try:
        singles = [backend.run(item) for item in items]
        batched = backend.run({name: np.concatenate([item[name] for item in items]) for name in shapes})
    except Exception as exc:
        return f"a batch of {rows} failed: {type(exc).__name__}: {exc}"
    for name in backend.output_names:
        expected = np.concatenate([single[name] for single in singles])
        got = batched[name]
        if got.shape != expected.shape:
            return f"output {name} has shape {got.shape} for a batch of {rows} items, {expected.shape} expected"
        scale = max(1.0, float(np.max(np.abs(np.nan_to_num(expected)))))
        if not np.allclose(got, expected, rtol=BATCH_TOLERANCE, atol=BATCH_TOLERANCE * scale, equal_nan=True):
            worst = float(np.nanmax(np.abs(got - expected)))
            return f"output {name} of a batch differs from the items run alone by up to {worst:.3g}"
    return None
