"""verl's in-place weight sync into vLLM's CPU build, as verl 0.9 does it, in one process.

Usage: python vllm_sync_driver.py MODEL_DIR (prints RESULT {json}). The engine starts from
dummy weights (as verl starts it); the model's weights are then sent the way verl's FSDP
engine exports them (per-expert keys) and loaded the way verl's vLLM worker extension does
(``model.load_weights`` then one ``process_weights_after_loading``). Reported: how far the
engine's log-probs are from transformers' on the same tokens, before and after the sync, and
whether every engine parameter then equals the one a second engine loaded from disk.
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, to reach its model
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def logprob_gap(llm, model, prompts) -> float:
    import torch
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=6, temperature=1.0, logprobs=0, ignore_eos=True, seed=0),
                        use_tqdm=False)
    gaps = []
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        with torch.no_grad():
            ref = model(torch.tensor([p + list(c.token_ids)])).logits[0].log_softmax(-1)
        gaps += [abs(c.logprobs[j][t].logprob - ref[len(p) - 1 + j, t].item()) for j, t in enumerate(c.token_ids)]
    return max(gaps)


def main(path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from verl.workers.engine.fsdp.utils import unfuse_moe_params
    from vllm import LLM
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[(5 * i + 7 * j) % 250 + 3 for j in range(4 + 3 * i)] for i in range(4)]
    kw = dict(model=path, dtype="float32", enforce_eager=True, max_model_len=128, block_size=32, seed=0)
    disk = LLM(**kw)
    disk_params = {n: p.detach().clone()
                   for n, p in disk.llm_engine.model_executor.driver_worker.worker.model_runner.model.named_parameters()}
    disk_gap = logprob_gap(disk, model, prompts)
    del disk
    llm = LLM(load_format="dummy", **kw)
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    before = logprob_gap(llm, model, prompts)
    for _ in range(2):  # every step syncs again
        runner.model.load_weights(list(unfuse_moe_params(model.state_dict().items())))
        process_weights_after_loading(runner.model, runner.model_config, torch.device("cpu"))
    after = logprob_gap(llm, model, prompts)
    differ = [n for n, p in runner.model.named_parameters()
              if p.shape != disk_params[n].shape or not torch.equal(p.detach(), disk_params[n])]
    return {"disk_gap": disk_gap, "dummy_gap": before, "synced_gap": after, "differ": differ,
            "params": len(disk_params)}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])))
