"""Multi-turn routing through verl's ToolAgentLoop: each turn keeps the routing it was generated with.

The conversations run in a child process (``cpu_verl.run_cpu_verl``, under a timeout) with
everything real: Ray, the ``hf`` rollout server (verl_r3.integration.hf_rollout) behind verl's
``GlobalRequestLoadBalancer`` and ``FullyAsyncLLMServerClient``, verl's ``AgentLoopWorker``
running the registered ``tool_agent`` loop, a ``BaseTool`` loaded from a tool config file and a
tool parser registered with ``ToolParser.register``. A random tiny model emits no tool-call
syntax, so the registered parser reads every assistant turn as a call to the tool; verl then
appends the tool's response and asks for the next turn, three assistant turns in all.

What makes the test able to fail: between turns the rollout server receives new weights (new
router weights), as in verl's asynchronous training, where the trainer syncs weights while
conversations are in flight. A later turn's prefill then routes the earlier tokens differently
from how they were routed when generated. (Precision alone is not enough here: on this tiny
model bf16 prefill and decode agree on every router.) The client records what every engine call
returned, so the expected record is built from the engine's own rows: each call contributes the
rows after those already recorded. Without the patch verl keeps only the last turn's rows, which
the test shows differ.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cpu_verl import run_cpu_verl  # noqa: E402

from verl_r3.patches import verl_tool_agent_loop_0_9 as patch  # noqa: E402
from verl_r3.patches.verl_tool_agent_loop_0_9 import stitch_turn  # noqa: E402

TIMEOUT_S = 300

_CHILD = r'''
import asyncio, json, os, tempfile

import numpy as np
import ray
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

import engine_harness as H
import verl
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
from verl.experimental.agent_loop.tool_parser import FunctionCall, ToolParser
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import ToolResponse
from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient, LLMServerClient
from verl.workers.rollout.router import GlobalRequestLoadBalancer

from verl_r3.integration.hf_rollout import HFRolloutServer
from verl_r3.patches import verl_tool_agent_loop_0_9 as patch

CASE = json.loads(os.environ["CASE"])
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] if m['content'] is string else '' }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class LookupTool(BaseTool):
    """Answers every call with a short text that depends on its argument only."""

    async def execute(self, instance_id, parameters, **kwargs):
        return ToolResponse(text=f"the value of key {parameters.get('key')}"), 0.0, {}


@ToolParser.register("every_turn_calls_lookup")
class EveryTurnCallsLookup(ToolParser):
    """Reads every assistant turn as one call of the lookup tool."""

    async def extract_tool_calls(self, responses_ids, tools=None):
        call = FunctionCall(name="lookup", arguments=json.dumps({"key": len(responses_ids)}))
        return self.tokenizer.decode(responses_ids), [call]


def rows_of(out):
    return None if out.routed_experts is None else np.asarray(out.routed_experts).tolist()


class AttemptLog(LLMServerClient):
    """Sits below FullyAsyncLLMServerClient: sees each engine call, including aborted attempts."""

    async def generate(self, request_id, **kwargs):
        out = await super().generate(request_id, **kwargs)
        self.log.append({"request": request_id, "kind": "attempt", "prompt_ids": list(kwargs["prompt_ids"]),
                         "token_ids": list(out.token_ids), "rows": rows_of(out), "stop": out.stop_reason})
        if out.stop_reason == "aborted":
            await self.on_abort()
        return out


class Client(FullyAsyncLLMServerClient, AttemptLog):
    """verl's partial-rollout client; records each turn and plays the trainer between turns."""

    def setup(self, server, weights, sync_each_turn=False, abort_turn=None):
        self.server, self.weights, self.sync_each_turn, self.abort_turn = server, weights, sync_each_turn, abort_turn
        self.log, self.turns_seen, self.version = [], {}, 0

    async def sync(self):
        self.version += 1
        await self.server.load_weights.remote(self.weights(self.version), self.version)

    async def on_abort(self):  # what verl's rollouter does: sync weights, then resume
        await self.sync()
        await self.server.resume_generation.remote()

    async def generate(self, request_id, **kwargs):
        turn = self.turns_seen[request_id] = self.turns_seen.get(request_id, 0) + 1
        if turn == self.abort_turn:  # the next engine call stops after its first token, as an abort would
            await self.server.__ray_call__.remote(lambda actor: actor.engine.abort.set())
        out = await super().generate(request_id, **kwargs)
        self.log.append({"request": request_id, "kind": "turn", "prompt_ids": list(kwargs["prompt_ids"]),
                         "token_ids": list(out.token_ids), "rows": rows_of(out), "stop": out.stop_reason})
        if self.sync_each_turn:
            await self.sync()
        return out


def main():
    path, cfg, tok = H.model_dir()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    work = tempfile.mkdtemp()
    tools_yaml = os.path.join(work, "tools.yaml")
    with open(tools_yaml, "w") as f:
        f.write(
            "tools:\n  - class_name: __main__.LookupTool\n    config: {type: native}\n    tool_schema:\n"
            "      type: function\n      function:\n        name: lookup\n        description: look a key up\n"
            "        parameters: {type: object, properties: {key: {type: string, description: the key}}, "
            "required: [key]}\n")
    overrides = [
        f"actor_rollout_ref.model.path={path}", "actor_rollout_ref.rollout.name=hf",
        f"actor_rollout_ref.rollout.enable_rollout_routing_replay={CASE['routing']}",
        "actor_rollout_ref.rollout.prompt_length=64", "actor_rollout_ref.rollout.response_length=160",
        "actor_rollout_ref.rollout.multi_turn.enable=True",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tools_yaml}",
        "actor_rollout_ref.rollout.multi_turn.format=every_turn_calls_lookup",
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3",
        "actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent",
    ]
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer/config"),
                               version_base=None):
        config = compose("ppo_trainer", overrides=overrides)

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base = [(name, p.detach().clone()) for name, p in reference.named_parameters()]

    def weights(version):  # the same model with freshly drawn router weights
        gen = torch.Generator().manual_seed(1000 + version)
        return [(n, torch.randn(t.shape, generator=gen) * t.std() if n.endswith("mlp.gate.weight") else t)
                for n, t in base]

    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        from verl.workers.config import HFModelConfig
        from verl.utils.config import omega_conf_to_dataclass

        model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model, dataclass_type=HFModelConfig)
        server = ray.remote(HFRolloutServer).options(name="hf_server_0").remote(
            config=config.actor_rollout_ref.rollout, model_config=model_config, replica_rank=0)
        ray.get(server.set_global_steps.remote(0))
        balancer = ray.remote(GlobalRequestLoadBalancer).remote(servers={"hf_server_0": server})

        results = {}
        for name, scenario in CASE["scenarios"].items():
            if scenario.get("patched", True):
                patch.apply()
            else:
                patch.revert()
            ray.get(server.load_weights.remote(weights(0), 0))
            client = Client(config, load_balancer_handle=balancer)
            client.setup(server, weights, sync_each_turn=scenario.get("sync_each_turn", False),
                         abort_turn=scenario.get("abort_turn"))
            worker = AgentLoopWorker(config, llm_client=client)
            params = {"temperature": scenario.get("temperature", 1.0), "top_p": 1.0, "top_k": -1, "logprobs": True,
                      "max_tokens": 6, "ignore_eos": True}

            async def one(i, question):
                trajectory = {"step": 0, "sample_index": i, "rollout_n": 0, "validate": False}
                out = await worker._run_agent_loop(dict(params), trajectory, agent_name="tool_agent", index=i,
                                                   raw_prompt=[{"role": "user", "content": question}])
                mask = out.attention_mask[0].bool()
                return {
                    "input_ids": out.input_ids[0][mask].tolist(),
                    "response_mask": out.response_mask[0].tolist(),
                    "logprobs": None if out.response_logprobs is None else out.response_logprobs[0].tolist(),
                    "routed": None if out.routed_experts is None else out.routed_experts[0][mask].tolist(),
                    "turns": out.num_turns,
                }

            async def run_all():
                if scenario.get("sequential"):  # one conversation in the engine at a time
                    return [await one(i, q) for i, q in enumerate(scenario["questions"])]
                return await asyncio.gather(*[one(i, q) for i, q in enumerate(scenario["questions"])])

            outputs = asyncio.run(run_all())
            results[name] = {"outputs": outputs, "log": client.log}
        print("RESULT " + json.dumps(results))
    finally:
        ray.shutdown()


main()
'''

_QUESTIONS = ["what is the first key?", "name two keys"]
_SCENARIOS = {
    # Two conversations at once (batched in the engine), new router weights after every turn.
    "stitched": {"questions": _QUESTIONS, "sync_each_turn": True},
    # The same with verl's own ToolAgentLoop: only the last turn's rows survive.
    "unpatched": {"questions": _QUESTIONS[:1], "sync_each_turn": True, "patched": False},
    # Turn 2's first engine call is aborted after one token; new weights, then verl's client resumes it.
    "resumed": {"questions": _QUESTIONS[:1], "abort_turn": 2},
}


@pytest.fixture(scope="module")
def routed_runs():
    return run_cpu_verl(_CHILD, {"routing": True, "scenarios": _SCENARIOS}, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def unrouted_runs():
    # Greedy, and one conversation at a time: which turns the engine batches together depends on
    # timing, and a batch's padding moves log-probs in their last bits (and can flip a near-tie).
    greedy = {"questions": _QUESTIONS, "temperature": 0.0, "sequential": True}
    scenarios = {"patched": greedy, "unpatched": {**greedy, "patched": False}}
    return run_cpu_verl(_CHILD, {"routing": False, "scenarios": scenarios}, timeout_s=TIMEOUT_S)


def _calls(log, request, kind):
    return [entry for entry in log if entry["request"] == request and entry["kind"] == kind]


def _conversation(result, output):
    """The request whose last turn produced ``output``'s sequence."""
    for entry in result["log"]:
        if entry["kind"] == "turn" and entry["prompt_ids"] + entry["token_ids"] == output["input_ids"]:
            return entry["request"]
    raise AssertionError("no recorded turn ends with the sequence the agent loop returned")


def _expected(calls) -> np.ndarray:
    """Each engine call's rows after those already recorded (the engines return whole sequences)."""
    rows = np.asarray(calls[0]["rows"])
    for call in calls[1:]:
        rows = np.concatenate([rows, np.asarray(call["rows"])[len(rows):]])
    return rows


def _routed(output) -> np.ndarray:
    routed = np.asarray(output["routed"])
    n = len(output["input_ids"])
    assert routed.shape[0] == n
    assert not routed[n - 1].any()  # verl's zero row for the last token, which the engine never fed
    return routed[: n - 1]


@pytest.mark.slow
def test_every_turn_keeps_the_routing_it_was_generated_with(routed_runs):
    result = routed_runs["stitched"]
    assert len(result["outputs"]) == 2
    for output in result["outputs"]:
        request = _conversation(result, output)
        turns = _calls(result["log"], request, "turn")
        assert len(turns) == 3 and output["turns"] == 6  # user, 3 assistant turns, 2 tool responses
        for earlier, later in zip(turns, turns[1:]):  # a tool response lies between turns
            assert len(later["prompt_ids"]) > len(earlier["prompt_ids"]) + len(earlier["token_ids"])
            assert later["prompt_ids"][: len(earlier["prompt_ids"]) + len(earlier["token_ids"])] == \
                earlier["prompt_ids"] + earlier["token_ids"]
        expected = _expected(turns)
        assert expected.shape[0] == len(output["input_ids"]) - 1
        np.testing.assert_array_equal(_routed(output), expected)
        # The rows verl alone would keep (the last turn's) differ on the earlier turns' generated tokens.
        last = np.asarray(turns[-1]["rows"])
        generated = [p for t in turns[:-1] for p in range(len(t["prompt_ids"]), len(t["prompt_ids"]) +
                                                           len(t["token_ids"]) - 1)]
        differing = [p for p in generated if not np.array_equal(np.sort(last[p], -1), np.sort(expected[p], -1))]
        assert len(differing) >= len(generated) // 4, (len(differing), len(generated))


@pytest.mark.slow
def test_without_the_patch_verl_keeps_only_the_last_turns_prefill_routing(routed_runs):
    result = routed_runs["unpatched"]
    (output,) = result["outputs"]
    turns = _calls(result["log"], _conversation(result, output), "turn")
    assert len(turns) == 3
    routed = _routed(output)
    np.testing.assert_array_equal(routed, np.asarray(turns[-1]["rows"]))
    assert not np.array_equal(routed, _expected(turns))  # what the patched loop returns is different


@pytest.mark.slow
def test_a_resumed_partial_turn_adds_no_prefix_twice(routed_runs):
    result = routed_runs["resumed"]
    (output,) = result["outputs"]
    request = _conversation(result, output)
    attempts = _calls(result["log"], request, "attempt")
    turns = _calls(result["log"], request, "turn")
    assert [a["stop"] for a in attempts][:2] == ["completed", "aborted"] and len(attempts) == 4
    aborted, resumed = attempts[1], attempts[2]
    assert len(aborted["token_ids"]) == 1 and resumed["prompt_ids"] == aborted["prompt_ids"] + aborted["token_ids"]
    # verl's client merged the two attempts into one turn: one row per token fed, no repeated prefix.
    second = turns[1]
    assert second["token_ids"] == aborted["token_ids"] + resumed["token_ids"]
    assert len(second["rows"]) == len(second["prompt_ids"]) + len(second["token_ids"]) - 1
    routed = _routed(output)
    assert routed.shape[0] == len(output["input_ids"]) - 1
    np.testing.assert_array_equal(routed, _expected(attempts))


@pytest.mark.slow
def test_without_routing_the_loop_behaves_as_verls(unrouted_runs):
    patched, unpatched = unrouted_runs["patched"]["outputs"], unrouted_runs["unpatched"]["outputs"]
    assert all(o["routed"] is None for o in patched + unpatched)
    assert all(o["turns"] == 6 for o in patched)
    assert patched == unpatched


# -- stitch_turn on its own ----------------------------------------------------------------
L, K = 3, 2


def _rows(n, offset=0):
    ids = (np.arange(n)[:, None, None] + offset + np.arange(L)[None, :, None] + np.arange(K)[None, None, :]) % 8
    return ids.astype(np.int32)


def test_whole_sequence_outputs_keep_earlier_rows_and_append_the_rest():
    first = _rows(9)  # prompt 5 + 5 generated: rows [0, 9)
    tokens = list(range(10))
    second = _rows(15, offset=3)  # prompt 12 (the 10 above + 2 tool tokens) + 4 generated
    out = stitch_turn(first, tokens, tokens + [50, 51], [1, 2, 3, 4], second, sample="request r")
    np.testing.assert_array_equal(out, np.concatenate([first, second[9:]]))
    # torch tensors are accepted as verl accepts them
    out_t = stitch_turn(torch.from_numpy(first), tokens, tokens + [50, 51], [1, 2, 3, 4], torch.from_numpy(second),
                        sample="request r")
    np.testing.assert_array_equal(out_t, out)


def test_an_output_from_the_recorded_end_is_appended():
    first, tokens = _rows(9), list(range(10))
    offset = _rows(6, offset=5)  # rows [9, 15) only, as SGLang returns with routed_experts_start_len=9
    out = stitch_turn(first, tokens, tokens + [50, 51], [1, 2, 3, 4], offset, sample="request r")
    np.testing.assert_array_equal(out, np.concatenate([first, offset]))


@pytest.mark.parametrize("rows, match", [
    (5, r"request r \(assistant turn 2\): .*starts at row 10 .*rows \[9, 10\) have no routing \(a gap"),
    (8, r"request r \(assistant turn 2\): .*starts at row 7 inside rows \[0, 9\).*overlapping"),
])
def test_offsets_that_overlap_or_leave_a_gap_raise(rows, match):
    with pytest.raises(ValueError, match=match):
        stitch_turn(_rows(9), list(range(10)), list(range(10)) + [50, 51], [1, 2, 3, 4], _rows(rows),
                    sample="request r (assistant turn 2)")


def test_more_rows_than_tokens_fed_or_other_layers_raise():
    with pytest.raises(ValueError, match=r"request r: the engine returned 16 routing rows for 12 prompt \+ 4"):
        stitch_turn(_rows(9), list(range(10)), list(range(12)), [1, 2, 3, 4], _rows(16), sample="request r")
    with pytest.raises(ValueError, match=r"request r: .*\(layers, top_k\)=\(3, 2\) but earlier turns recorded \(4"):
        stitch_turn(np.zeros((9, 4, 2), np.int32), list(range(10)), list(range(12)), [1, 2, 3, 4], _rows(15),
                    sample="request r")


def test_rows_of_tokens_the_next_prompt_changed_are_replaced():
    first, tokens = _rows(9), list(range(10))
    prompt = tokens[:7] + [70, 71, 72]  # a builder replaced the last three tokens at the turn boundary
    second = _rows(13, offset=4)
    out = stitch_turn(first, tokens, prompt, [1, 2, 3, 4], second, sample="request r")
    np.testing.assert_array_equal(out, np.concatenate([first[:7], second[7:]]))


# -- the patch module ----------------------------------------------------------------------
@pytest.fixture
def unapplied():
    was = patch.is_applied()
    patch.revert()
    yield
    patch.revert()
    if was:
        patch.apply()


def test_apply_and_revert_swap_the_method_idempotently(unapplied):
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop

    original = ToolAgentLoop.__dict__["_handle_generating_state"]
    assert patch.apply() is True and patch.apply() is False
    replaced = ToolAgentLoop.__dict__["_handle_generating_state"]
    assert replaced is not original and replaced.__wrapped__ is original
    assert patch.revert() is True and patch.revert() is False
    assert ToolAgentLoop.__dict__["_handle_generating_state"] is original


@pytest.mark.parametrize("version", ["0.8.9", "0.10.0"])
def test_refuses_verl_outside_its_window(unapplied, monkeypatch, version):
    monkeypatch.setattr(patch, "installed_verl_version", lambda: version)
    window = rf"verl_tool_agent_loop_0_9 supports verl >=0\.9\.0,<0\.10\.0, found verl {version}"
    with pytest.raises(RuntimeError, match=window):
        patch.apply()
    assert not patch.is_applied()


def test_refuses_a_loop_that_no_longer_stores_routing_per_turn(unapplied, monkeypatch):
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop

    async def _handle_generating_state(self, agent_data, sampling_params, ignore_termination=False):
        return None

    monkeypatch.setattr(ToolAgentLoop, "_handle_generating_state", _handle_generating_state)
    with pytest.raises(RuntimeError, match="no longer stores the turn's routing"):
        patch.apply()
    assert not patch.is_applied()


# -- the replacement coroutine around verl's, with verl's AgentData ---------------------------
def _agent_data():
    from verl.experimental.agent_loop.tool_agent_loop import AgentData

    data = AgentData(messages=[], image_data=None, video_data=None, audio_data=None, mm_processor_kwargs=None,
                     metrics={}, request_id="req-7", tools_kwargs={})
    data.prompt_ids = list(range(10))
    return data


def _turn(token_ids, routed):
    """Does to agent_data what verl's _handle_generating_state does with an engine output."""

    async def generating(self, agent_data, sampling_params):
        agent_data.assistant_turns += 1
        agent_data.response_ids = token_ids
        agent_data.prompt_ids = agent_data.prompt_ids + token_ids
        if routed is not None:
            agent_data.routed_experts = routed
        return "next"

    return patch._stitching(generating)


def test_a_turn_without_routing_after_routed_turns_raises_naming_the_request():
    import asyncio

    data = _agent_data()
    assert asyncio.run(_turn([1, 2, 3], _rows(12))(None, data, {})) == "next"
    np.testing.assert_array_equal(data.routed_experts, _rows(12))
    data.prompt_ids += [50, 51]
    with pytest.raises(ValueError, match=r"request req-7 \(assistant turn 2\): the engine generated 2 tokens without"):
        asyncio.run(_turn([4, 5], None)(None, data, {}))
    np.testing.assert_array_equal(data.routed_experts, _rows(12))  # the recorded rows stay


def test_without_routing_the_replacement_changes_nothing():
    import asyncio

    data = _agent_data()
    for tokens in ([1, 2], [3], []):
        asyncio.run(_turn(tokens, None)(None, data, {}))
        assert data.routed_experts is None
