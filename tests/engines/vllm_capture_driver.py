"""Run vLLM (with routing capture) on a model directory and print every completion as JSON.

Used by test_vllm_capture.py in a subprocess (vLLM starts its engine with spawn; a crashed or
hung engine then cannot take the test process with it). Usage:
    python vllm_capture_driver.py MODEL_DIR SPEC_JSON
SPEC_JSON: {"engine": {engine_args kwargs}, "waves": [[{EngineRequest fields}, ...], ...]}.
Waves run one after another on the same engine (a later wave can hit the prefix cache).
"""

import asyncio
import json
import sys


async def main(model: str, spec: dict) -> dict:
    from verl_r3.engines import vllm_engine as V

    engine = V.start_engine(model, **spec.get("engine", {}))
    try:
        waves = []
        for wave in spec["waves"]:
            figures = await V.run(engine, [V.EngineRequest(**r) for r in wave])
            waves.append([{
                "request": c.request, "index": c.index, "prompt_ids": c.prompt_ids, "token_ids": c.token_ids,
                "aborted": c.aborted, "finish_reason": c.finish_reason, "num_cached_tokens": c.num_cached_tokens,
                "routed_experts": None if c.routed_experts is None else c.routed_experts.tolist(),
                "dtype": None if c.routed_experts is None else str(c.routed_experts.dtype),
            } for c in figures.completions])
        from verl_r3.patches import vllm_front_end_routing_0_32

        return {"waves": waves, "front_end_routing_rows": vllm_front_end_routing_0_32.is_applied(),
                "preemptions": V.counter("vllm:num_preemptions"),
                "prefix_cache_hits": V.counter("vllm:prefix_cache_hits")}
    finally:
        engine.shutdown()


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
    print("RESULT " + json.dumps(result))
