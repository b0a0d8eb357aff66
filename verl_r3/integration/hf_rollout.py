"""Rollout engine ``hf``: transformers generation behind verl's async rollout interface.

``actor_rollout_ref.rollout.name=hf`` selects it (after ``register_hf_rollout()``, which
``verl_r3.integration.activate`` runs in every verl process). It is the reference engine of
verl_r3: small, exact about what it returns, and runnable anywhere transformers runs (the
CPU quickstart uses it). vLLM and SGLang are the engines for throughput.

What verl needs from a rollout backend, and what this module gives it
    ``HFRolloutServer``, one Ray actor per replica, holds the model and serves
    ``generate(prompt_ids, sampling_params, request_id, ...) -> TokenOutput`` like verl's
    vLLM and SGLang servers: response token ids, the log-prob of each sampled token, and,
    with ``rollout.enable_rollout_routing_replay``, the routing as a ``[n - 1, layers, top_k]``
    numpy array over the ``n`` prompt + response tokens, laid out as vLLM returns it: row
    ``i`` is the experts that token ``i`` was routed to (the last token is never fed to the
    model, so it has no row), ids are ``uint8`` up to 256 experts (one byte per id on the way
    to the trainer) and ``uint16`` above, and layers without MoE hold zeros
    (``engine_rows``). Concurrent requests are batched by ``HFBatcher`` (no verl objects;
    ``verl-r3 stress`` drives it directly): those waiting when a batch starts are generated
    together (left-padded, one KV cache), the rest wait for the next batch. ``HFReplica``
    launches the server (verl's ``RolloutReplicaRegistry``); ``HFRolloutAdapter`` is the
    worker-side half (``_ROLLOUT_REGISTRY``) that streams the actor's weights into it every
    step.

Aborts
    ``abort_request(request_id)`` stops one request. Still queued, it ends at once with no
    tokens. Running, it ends at the generator's next decode step while the rest of its batch
    goes on; it returns the tokens sampled so far, their log-probs, and routing rows for exactly
    the tokens fed (prompt + tokens - 1), with ``stop_reason="aborted"``. A request that
    finishes before that step returns ``"completed"``, as in vLLM. ``abort_all_requests`` stops
    the whole running batch the same way, ends every queued request, and parks new ones until
    ``resume_generation``.

Sampling and log-probs
    ``temperature`` (0 means greedy), ``top_k`` and ``top_p`` shape the sampling
    distribution; the log-prob returned is ``log_softmax(logits / temperature)`` at the
    sampled token (before top-k/top-p), which is what verl's trainer recomputes. Generation
    stops at an EOS id (``ignore_eos`` turns that off) or at ``max_tokens``. Each request
    samples from its own stream, seeded by (``rollout.seed``, weights version, prompt, how many
    times that prompt was requested under these weights): a run's rollouts do not depend on
    arrival order or batching, and runs that differ only after the rollout (R3 or not, GRPO or
    GSPO) score the same first-step rollouts.

Precision
    ``rollout.dtype`` (verl's key; bf16 by default) is the dtype the rollout model runs in,
    so that, as with GPU engines, the rollout computes in lower precision than the fp32
    trainer and its routing genuinely differs from the trainer's.

Weights
    verl hands the rollout the actor's full tensors with transformers-5 packed experts split
    per expert (``experts.{e}.gate_proj/up_proj/down_proj.weight``); they are fused back.
    Every model parameter must be covered and every tensor must land somewhere, else the
    sync fails naming the keys. Tensors travel to the server through Ray's object store,
    which is fine for the small models this engine is meant for.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from verl_r3.core.record import storage_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "NAME",
    "HFBatcher",
    "HFGenerator",
    "Request",
    "Result",
    "engine_rows",
    "fuse_expert_weights",
    "REPLICA_REGISTRY_MODULE",
    "ROLLOUT_REGISTRY_MODULE",
    "register_hf_replica",
    "register_hf_rollout",
    "register_hf_rollout_worker",
]

NAME = "hf"
_ADAPTER_PATH = f"{__name__}.HFRolloutAdapter"

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """``rollout.dtype`` -> torch dtype; unknown names are refused."""
    key = str(name).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"rollout.dtype {name!r} is not one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


# -- weights ------------------------------------------------------------------------------
_PER_EXPERT = re.compile(r"^(?P<base>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def fuse_expert_weights(named: Iterable[tuple[str, torch.Tensor]], params: dict[str, torch.Tensor]) -> dict:
    """Map verl's streamed weights onto ``params`` (the model's names and shapes).

    Per-expert keys are stacked back into the packed ``experts.gate_up_proj`` ([E, 2I, H],
    gate rows then up rows) and ``experts.down_proj`` ([E, H, I]) where the model packs
    them. Raises ``ValueError`` naming unknown keys, missing parameters and shape mismatches.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    unknown = []
    for name, tensor in named:
        match = _PER_EXPERT.match(name)
        if name in params:
            out[name] = tensor
        elif match and (f"{match['base']}.gate_up_proj" in params or f"{match['base']}.down_proj" in params):
            experts.setdefault(match["base"], {})[(match["proj"], int(match["e"]))] = tensor
        else:
            unknown.append(name)
    for base, parts in experts.items():
        count = 1 + max(e for _, e in parts)
        for packed, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            key = f"{base}.{packed}"
            if key not in params:
                continue
            missing = [f"{base}.{e}.{p}.weight" for e in range(count) for p in projs if (p, e) not in parts]
            if missing:
                raise ValueError(f"weight sync: packed {key} lacks per-expert tensors {missing[:4]}")
            out[key] = torch.stack([torch.cat([parts[(p, e)] for p in projs]) for e in range(count)])
    if unknown:
        raise ValueError(f"weight sync: {len(unknown)} tensors match no rollout parameter, e.g. {unknown[:4]}")
    missing = sorted(set(params) - set(out))
    if missing:
        raise ValueError(f"weight sync: {len(missing)} rollout parameters were not sent, e.g. {missing[:4]}")
    bad = [(k, tuple(v.shape), tuple(params[k].shape)) for k, v in out.items() if v.shape != params[k].shape]
    if bad:
        raise ValueError(f"weight sync: shape mismatch (name, sent, expected): {bad[:4]}")
    return out


# -- generation ---------------------------------------------------------------------------
@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    ignore_eos: bool = False
    seed: int | None = None  # sampling seed of this request; None: the generator's own stream
    request_id: str | None = None  # the caller's name for it (HFBatcher.abort finds it by this)
    # Set from any thread to stop this request at the generator's next decode step.
    stop: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    # Tokens sampled so far, written by the generator after every step (read by progress()).
    generated: int = field(default=0, compare=False)


@dataclass
class Result:
    token_ids: list[int]
    log_probs: list[float]
    routed_experts: np.ndarray | None  # [len(prompt) + len(response) - 1, layers, top_k], see engine_rows
    stop_reason: str  # "completed" or "aborted"


def engine_rows(recorded: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Recorded routing (``RouterReplay.record``: -1 in layers without MoE) as vLLM returns it: ids in
    ``storage_dtype`` (one byte each up to 256 experts, ``uint16`` above), zeros in layers without
    MoE, on the host."""
    return recorded.clamp(min=0).to(device="cpu", dtype=storage_dtype(num_experts))


class HFGenerator:
    """A transformers causal LM generating batches of requests, optionally with routing capture."""

    def __init__(self, model_path: str, *, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                 capture_routing: bool = False, seed: int = 0, eos_token_ids: Iterable[int] | None = None,
                 pad_token_id: int | None = None, attn_implementation: str = "sdpa") -> None:
        import transformers

        kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
        if device == "cpu":
            kwargs["experts_implementation"] = "eager"  # grouped_mm is several times slower on CPU
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        except (TypeError, ValueError):
            kwargs.pop("experts_implementation", None)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        self.model.to(device).eval()
        self.device = torch.device(device)
        config = self.model.config
        if eos_token_ids is None:
            gen = getattr(self.model, "generation_config", None)
            eos = getattr(gen, "eos_token_id", None) if gen is not None else None
            eos = config.eos_token_id if eos is None else eos
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=self.device)
        pad = config.pad_token_id if pad_token_id is None else pad_token_id
        self.pad = int(pad if pad is not None else (eos_token_ids[0] if eos_token_ids else 0))
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.rr = None
        if capture_routing:
            from verl_r3.core.replay import RouterReplay

            self.rr = RouterReplay(self.model)
        self.abort = threading.Event()
        self.lock = threading.Lock()

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy verl's streamed weights into the model (see ``fuse_expert_weights``)."""
        params = dict(self.model.named_parameters())
        state = fuse_expert_weights(named, params)
        with self.lock, torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
        return len(state)

    # one batch ---------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, reqs: list[Request], streams: list[torch.Generator]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        temp = torch.tensor([r.temperature for r in reqs], device=logits.device)
        greedy = temp <= 0
        scaled = logits / torch.where(greedy, torch.ones_like(temp), temp).unsqueeze(-1)
        logp = torch.log_softmax(scaled, dim=-1)
        vocab = logits.shape[-1]
        top_k = torch.tensor([r.top_k if 0 < r.top_k < vocab else vocab for r in reqs], device=logits.device)
        top_p = torch.tensor([r.top_p for r in reqs], device=logits.device, dtype=torch.float32)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        drop = ranks >= top_k.unsqueeze(-1)
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(-1)  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        # One uniform per row from that request's own stream: a request samples the same tokens
        # whatever else shares its batch.
        u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in streams])
        cdf = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=vocab - 1)
        sampled = order.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        tokens = torch.where(greedy, logits.argmax(-1), sampled)
        return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def generate(self, reqs: list[Request]) -> list[Result]:
        """Generate all of ``reqs`` as one left-padded batch."""
        if not reqs:
            return []
        with self.lock:
            if self.rr is None:
                return self._generate(reqs, None)
            with self.rr.record() as handle:
                return self._generate(reqs, handle)

    def _generate(self, reqs: list[Request], handle) -> list[Result]:
        B = len(reqs)
        lengths = [len(r.prompt_ids) for r in reqs]
        if min(lengths) < 1:
            raise ValueError(f"request {lengths.index(0)} of the batch has an empty prompt")
        P = max(lengths)
        ids = torch.full((B, P), self.pad, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, P - lengths[b]:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[b, P - lengths[b]:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        max_new = max(r.max_tokens for r in reqs)
        limit = torch.tensor([r.max_tokens for r in reqs], device=self.device)
        stop_on_eos = torch.tensor([not r.ignore_eos for r in reqs], device=self.device)

        from transformers import DynamicCache

        streams = [torch.Generator(device=self.device).manual_seed(r.seed) if r.seed is not None else self.generator
                   for r in reqs]
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                         use_cache=True)
        tokens_T, logps_T = [], []
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        aborted = torch.zeros(B, dtype=torch.bool, device=self.device)
        produced = torch.zeros(B, dtype=torch.long, device=self.device)
        for step in range(max_new):
            token, logp = self._sample(out.logits[:, -1], reqs, streams)
            token = torch.where(done, torch.full_like(token, self.pad), token)
            tokens_T.append(token)
            logps_T.append(logp)
            produced += (~done).long()
            hit_eos = (token.unsqueeze(-1) == self.eos).any(-1) & stop_on_eos if self.eos.numel() else \
                torch.zeros_like(done)
            done |= hit_eos | (produced >= limit)
            for r, n in zip(reqs, produced.tolist()):
                r.generated = n
            # A stopped request keeps the token it just sampled; that token is never fed, so its
            # routing ends at prompt + tokens - 1 rows like everyone else's.
            stop = torch.tensor([self.abort.is_set() or r.stop.is_set() for r in reqs], device=self.device) & ~done
            aborted |= stop
            done |= stop
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=1)
            position = position[:, -1:] + 1
            out = self.model(input_ids=token.unsqueeze(-1), attention_mask=mask, position_ids=position,
                             past_key_values=cache, use_cache=True)
        tokens = torch.stack(tokens_T, dim=1).cpu() if tokens_T else torch.zeros((B, 0), dtype=torch.long)
        logps = torch.stack(logps_T, dim=1).float().cpu() if logps_T else torch.zeros((B, 0))
        counts = produced.cpu().tolist()
        routed = self._request_routing(handle, P, lengths, counts) if handle is not None else [None] * B
        results = []
        for b, r in enumerate(reqs):
            n = counts[b]
            results.append(Result(
                token_ids=tokens[b, :n].tolist(),
                log_probs=logps[b, :n].tolist(),
                routed_experts=routed[b],
                stop_reason="aborted" if bool(aborted[b]) else "completed",
            ))
        return results

    def _request_routing(self, handle, P: int, lengths: list[int], counts: list[int]) -> list[np.ndarray]:
        """Each request's rows, ``[prompt + tokens - 1, L, K]`` as vLLM returns them, from the batch's
        recorded forwards: ``forwards[0]`` is the prefill ``[B, P, L, K]``, ``forwards[s]`` (s >= 1)
        the decode of token s - 1 at position P + s - 1, so a request's rows are one slice from its
        first prompt token on."""
        routing = engine_rows(torch.cat(handle.forwards, dim=1), self.rr.num_experts)
        return [routing[b, P - lengths[b]:P + max(n - 1, 0)].clone().numpy() for b, n in enumerate(counts)]


# -- batching front -------------------------------------------------------------------------
class HFBatcher:
    """Concurrent requests onto one ``HFGenerator``, batch by batch, with per-request abort.

    Lives on one asyncio event loop (call every method from it); generation runs in a worker
    thread. Requests waiting when a batch starts (after ``batch_wait_s``, so that concurrent
    arrivals meet) are generated together, up to ``max_batch``; the rest wait for the next.
    """

    def __init__(self, generator: HFGenerator, *, max_batch: int = 256, batch_wait_s: float = 0.02) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.generator = generator
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.batches = 0  # batches generated so far
        self._pending: list[tuple[Request, asyncio.Future]] = []
        self._running: list[Request] = []
        self._wake: asyncio.Event | None = None
        self._loop_task = None
        self._gate_open = True

    async def generate(self, req: Request) -> Result:
        """Queue ``req`` and wait for its result (errors of its batch are raised here)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((req, future))
        if self._loop_task is None or self._loop_task.done():  # first call, or a new event loop
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        self._wake.set()
        return await future

    def abort(self, request_id: str) -> bool:
        """Stop every request named ``request_id``: queued ones end now with no tokens, running
        ones at the next decode step. False when none is queued or running."""
        queued = [(r, f) for r, f in self._pending if r.request_id == request_id]
        self._pending = [(r, f) for r, f in self._pending if r.request_id != request_id]
        for _, fut in queued:
            if not fut.done():
                fut.set_result(Result([], [], None, "aborted"))
        running = [r for r in self._running if r.request_id == request_id]
        for r in running:
            r.stop.set()
        return bool(queued or running)

    def progress(self, request_id: str) -> int | None:
        """Tokens generated so far by ``request_id`` (0 while queued); None when it is neither
        queued nor running."""
        for r in self._running:
            if r.request_id == request_id:
                return r.generated
        return 0 if any(r.request_id == request_id for r, _ in self._pending) else None

    def abort_all(self) -> int:
        """Stop the running batch, end every queued request and park new ones until ``resume``;
        returns how many queued requests were ended."""
        self._gate_open = False
        self.generator.abort.set()
        pending, self._pending = self._pending, []
        for _, fut in pending:
            if not fut.done():
                fut.set_result(Result([], [], None, "aborted"))
        return len(pending)

    def resume(self) -> None:
        self.generator.abort.clear()
        self._gate_open = True
        if self._wake is not None:
            self._wake.set()

    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.batch_wait_s)  # let concurrent requests arrive
            while self._pending and self._gate_open:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                self._running = [r for r, _ in batch]
                self.batches += 1
                try:
                    results = await asyncio.to_thread(self.generator.generate, self._running)
                except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                finally:
                    self._running = []
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)


# -- verl: server, replica, worker-side adapter ---------------------------------------------
def _server_name(replica_rank: int, suffix: str = "") -> str:
    return f"{NAME}_server_{replica_rank}{suffix}"


class HFRolloutServer:
    """Ray actor serving one replica (see the module docstring)."""

    def __init__(self, config, model_config, replica_rank: int = 0, batch_wait_s: float = 0.02) -> None:
        from verl.utils.config import omega_conf_to_dataclass

        self.config = omega_conf_to_dataclass(config)
        self.model_config = model_config
        self.replica_rank = replica_rank
        self.batch_wait_s = batch_wait_s
        path = getattr(model_config, "local_path", None) or model_config.path
        device = "cuda" if torch.cuda.is_available() else "cpu"
        eos = None
        gen_cfg = getattr(model_config, "generation_config", None)
        if gen_cfg is not None and getattr(gen_cfg, "eos_token_id", None) is not None:
            e = gen_cfg.eos_token_id
            eos = [e] if isinstance(e, int) else list(e)
        tokenizer = getattr(model_config, "tokenizer", None)
        if eos is None and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id]
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.engine = HFGenerator(
            path, dtype=torch_dtype(self.config.dtype), device=device,
            capture_routing=bool(self.config.enable_rollout_routing_replay),
            seed=int(getattr(self.config, "seed", 0) or 0) + replica_rank, eos_token_ids=eos, pad_token_id=pad,
        )
        self.seed = int(getattr(self.config, "seed", 0) or 0) + replica_rank
        self.global_steps = None
        self._repeats: dict[tuple[int, ...], int] = {}
        self.batcher = HFBatcher(self.engine, max_batch=int(getattr(self.config, "max_num_seqs", 256) or 256),
                                 batch_wait_s=batch_wait_s)
        logger.info("hf rollout server %d: %s in %s on %s, routing capture %s", replica_rank, path,
                    self.config.dtype, device, self.engine.rr is not None)

    # requests ----------------------------------------------------------------------------
    def _request(self, prompt_ids, sampling_params: dict, request_id: str | None = None) -> Request:
        params = dict(sampling_params)
        n_prompt = len(prompt_ids)
        max_len = int(self.config.prompt_length + self.config.response_length)
        default = min(int(self.config.response_length), max_len - n_prompt)
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", default))
        max_tokens = max(1, min(int(max_tokens), max_len - n_prompt))
        if max_len - n_prompt < 1:
            raise ValueError(f"prompt of {n_prompt} tokens leaves no room within prompt_length + response_length "
                             f"= {max_len}")
        ids = [int(t) for t in prompt_ids]
        # The k-th request for the same prompt under the same weights gets the same seed in every
        # run: rollouts do not depend on arrival order or on how requests were batched.
        repeat = self._repeats.get(tuple(ids), 0)
        self._repeats[tuple(ids)] = repeat + 1
        digest = hashlib.blake2b(repr((self.seed, self.global_steps, ids, repeat)).encode(), digest_size=8).digest()
        return Request(
            prompt_ids=ids, max_tokens=max_tokens, seed=int.from_bytes(digest, "little") >> 1,
            temperature=float(params.get("temperature", 1.0)), top_k=int(params.get("top_k", -1) or -1),
            top_p=float(params.get("top_p", 1.0)), ignore_eos=bool(params.get("ignore_eos", False)),
            request_id=request_id,
        )

    async def generate(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None,
                       audio_data=None, mm_processor_kwargs=None, priority: int = 0, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        if image_data or video_data or audio_data:
            raise ValueError(f"request {request_id}: the hf rollout serves text only")
        result = await self.batcher.generate(self._request(prompt_ids, sampling_params, request_id))
        routed = result.routed_experts if self.config.enable_rollout_routing_replay else None
        return TokenOutput(
            token_ids=result.token_ids, log_probs=result.log_probs, routed_experts=routed,
            stop_reason=result.stop_reason, num_preempted=0,
            extra_fields={"global_steps": self.global_steps},
        )

    # weights -----------------------------------------------------------------------------
    async def load_weights(self, named: list[tuple[str, torch.Tensor]], global_steps=None) -> int:
        count = await asyncio.to_thread(self.engine.load_weights, named)
        if global_steps is not None:
            await self.set_global_steps(global_steps)
        return count

    async def set_global_steps(self, global_steps: int):
        if global_steps != self.global_steps:
            self._repeats.clear()
        self.global_steps = global_steps

    # control methods verl's replica fans out; weights stay resident (nothing to free) ---------
    async def wake_up(self, tags=None):
        return None

    async def sleep(self):
        return None

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None

    async def abort_all_requests(self, reject_request: bool = False, **kwargs) -> dict:
        """Stop the running batch (its requests return what they have, stop_reason aborted) and park new ones."""
        return {"aborted_count": self.batcher.abort_all(), "request_ids": []}

    async def resume_generation(self):
        self.batcher.resume()

    async def abort_request(self, request_id: str, **kwargs) -> dict:
        """Stop one request (see "Aborts" in the module docstring); verl's vLLM server's answer shape."""
        if self.batcher.abort(request_id):
            return {"aborted": True, "request_id": request_id}
        return {"aborted": False, "request_id": request_id,
                "error": f"request {request_id} is neither queued nor running"}


@functools.cache
def _replica_class():
    from verl.workers.rollout.replica import RolloutReplica

    class HFReplica(RolloutReplica):
        """verl rollout replica running ``HFRolloutServer`` (one server, one process)."""

        async def launch_servers(self):
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            if self.world_size != 1:
                raise ValueError(
                    "the hf rollout runs each replica in one process: set rollout tensor_model_parallel_size, "
                    f"data_parallel_size and pipeline_model_parallel_size to 1 (world size {self.world_size})"
                )
            if self.workers:
                node_id = await self.workers[0].__ray_call__.remote(lambda w: ray.get_runtime_context().get_node_id())
                strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
            else:
                strategy = None
            from verl.plugin.platform import get_platform

            env = {var: "1" for var in get_platform().ray_noset_envvars()}
            for key in ("VERL_USE_EXTERNAL_MODULES", "VERL_PLATFORM"):
                if os.environ.get(key):
                    env[key] = os.environ[key]
            name = _server_name(self.replica_rank, self.name_suffix)
            server = ray.remote(HFRolloutServer).options(
                scheduling_strategy=strategy, runtime_env={"env_vars": env}, name=name,
                max_concurrency=self.max_concurrency,
            ).remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
            self.servers = [server]
            self._server_handle = server
            self._server_address = name  # no HTTP endpoint: verl talks to the actor handle
            await server.set_global_steps.remote(None)  # waits for the model to load; surfaces its errors

        def rollout_worker_use_gpu(self) -> bool:
            return torch.cuda.is_available()

    return HFReplica


@functools.cache
def _adapter_class():
    from verl.workers.rollout.base import BaseRollout

    class HFRolloutAdapter(BaseRollout):
        """Worker side of the hf rollout: streams the actor's weights to the replica's server."""

        def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
            super().__init__(config, model_config, device_mesh)
            world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                     * self.config.pipeline_model_parallel_size)
            rank = int(os.environ.get("RANK", "0"))
            self.replica_rank = rank // world if replica_rank == -1 else replica_rank
            self.rollout_rank = rank % world
            self._server = None

        def _server_handle(self):
            if self._server is None:
                import ray

                self._server = ray.get_actor(_server_name(self.replica_rank))
            return self._server

        async def resume(self, tags: list[str]):
            return None

        async def release(self):
            return None

        @torch.no_grad()
        async def update_weights(self, weights, global_steps: int | None = None, wire_format: str = "named_tensors",
                                 **kwargs):
            if wire_format != "named_tensors":
                raise ValueError(f"the hf rollout takes wire_format='named_tensors', got {wire_format!r}")
            if kwargs.get("peft_config") is not None:
                raise ValueError("the hf rollout does not take LoRA adapters; merge them (lora.merge=True)")
            start = time.time()
            from verl.workers.rollout.utils import ensure_async_iterator

            named = []
            async for name, tensor in ensure_async_iterator(weights):  # drained on every rank: gathers are collective
                if self.rollout_rank == 0:
                    if hasattr(tensor, "full_tensor"):
                        tensor = tensor.full_tensor()
                    named.append((name, tensor.detach().to("cpu", copy=True)))
            if self.rollout_rank == 0:
                await self._server_handle().load_weights.remote(named, global_steps)
                logger.info("hf rollout: synced %d tensors in %.2fs", len(named), time.time() - start)

    return HFRolloutAdapter


def __getattr__(name: str):
    if name == "HFRolloutAdapter":  # verl's _ROLLOUT_REGISTRY imports it by path
        return _adapter_class()
    if name == "HFReplica":
        return _replica_class()
    raise AttributeError(name)


#: The verl modules holding the two registries ``hf`` goes into (worker side, replica side).
ROLLOUT_REGISTRY_MODULE = "verl.workers.rollout.base"
REPLICA_REGISTRY_MODULE = "verl.workers.rollout.replica"


def register_hf_rollout_worker(module=None) -> None:
    """Put ``hf`` in verl's worker-side rollout registry (``ROLLOUT_REGISTRY_MODULE``). Idempotent."""
    if module is None:
        import importlib

        module = importlib.import_module(ROLLOUT_REGISTRY_MODULE)
    module._ROLLOUT_REGISTRY.setdefault((NAME, "async"), _ADAPTER_PATH)


def register_hf_replica(module=None) -> None:
    """Put ``hf`` in verl's replica registry (``REPLICA_REGISTRY_MODULE``). Idempotent."""
    if module is None:
        import importlib

        module = importlib.import_module(REPLICA_REGISTRY_MODULE)
    if NAME not in module.RolloutReplicaRegistry._registry:
        module.RolloutReplicaRegistry.register(NAME, _replica_class)


def register_hf_rollout() -> None:
    """Register rollout name ``hf`` with verl (worker-side registry and replica registry). Idempotent."""
    register_hf_rollout_worker()
    register_hf_replica()
