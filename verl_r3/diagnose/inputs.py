"""Inputs of ``verl-r3 diagnose``: the model directory, its tokenizer and stop tokens, the prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from verl_r3.jsonl import read_jsonl


@dataclass
class ModelInfo:
    path: str
    model_type: str
    num_layers: int
    num_experts: int
    top_k: int
    max_positions: int | None


def inspect_model_dir(path: str | Path) -> ModelInfo:
    """Check that ``path`` is a Hugging Face MoE directory of a supported family; return its shape."""
    import transformers

    from verl_r3.core.replay import routing_dims

    folder, name = Path(path), repr(str(path))
    if not folder.is_dir():
        raise ValueError(f"model directory {name} {'is a file' if folder.exists() else 'does not exist'}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model directory {name} has no config.json (expected a Hugging Face model directory: "
                         "config, weights and tokenizer)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise ValueError(f"model directory {name} has no weights (*.safetensors or pytorch_model*.bin)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"model directory {name}: cannot read config.json: {exc}") from exc
    try:
        layers, top_k, experts = routing_dims(config)
    except ValueError as exc:  # an unsupported family (the supported ones named), or top-k above the experts
        raise ValueError(f"model directory {name}: {exc}") from exc
    return ModelInfo(str(folder), config.model_type, layers, experts, top_k,
                     getattr(config, "max_position_embeddings", None))


def load_tokenizer(path: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"model directory {path!r}: cannot load its tokenizer: {exc}") from exc


def _prompt_ids(tokenizer, value, where: str) -> list[int]:
    """Token ids of one prompt. A string is the literal prompt text; chat messages are rendered with
    the tokenizer's chat template and the generation prompt, as verl's RLHFDataset renders them."""
    if isinstance(value, str):
        ids = tokenizer(value)["input_ids"]
    elif hasattr(value, "__iter__") and not isinstance(value, (bytes, dict)):  # a list, or parquet's array
        messages = list(value)
        if not messages:
            raise ValueError(f"{where}: prompt is an empty list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: message {i} of the prompt is not a {{'role': str, 'content': str}} object")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where}: prompt is chat messages but the tokenizer has no chat template "
                             "(give the prompt as a string)")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise ValueError(f"{where}: prompt must be a string or a list of chat messages, got {type(value).__name__}")
    if not ids:
        raise ValueError(f"{where}: prompt has no tokens")
    return list(ids)


def prompts_file(path: str | Path) -> Path:
    """``path`` as a file, or ValueError saying what is there instead."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"prompts file {str(path)!r} {'is a directory' if file.is_dir() else 'does not exist'}")
    return file


def load_prompts(path: str | Path, tokenizer, limit: int | None = None) -> list[list[int]]:
    """Prompt token ids from verl's parquet (column ``prompt``: chat messages) or a jsonl file (one
    object a line with a ``prompt`` field: a string or chat messages); ``limit``: the first N."""
    file = prompts_file(path)
    prompts: list[list[int]] = []
    if file.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(file)
        if "prompt" not in frame.columns:
            raise ValueError(f"{file}: no 'prompt' column (columns: {', '.join(map(str, frame.columns))})")
        for row, value in enumerate(frame["prompt"][:limit]):
            prompts.append(_prompt_ids(tokenizer, value, f"{file}, row {row}"))
    elif file.suffix == ".jsonl":
        for number, obj in read_jsonl(file):
            if limit is not None and len(prompts) >= limit:
                break
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise ValueError(f"{file}, line {number}: no \"prompt\" field")
            prompts.append(_prompt_ids(tokenizer, obj["prompt"], f"{file}, line {number}"))
    else:
        raise ValueError(f"prompts file {str(path)!r}: expected a .parquet (verl's format) or .jsonl file")
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} holds no prompt")
    return prompts


def generated_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    """``count`` arithmetic word problems (``verl_r3.quickstart.data``) as chat prompts, or plain text
    when the tokenizer has no chat template; from a seed the demo's warm start never draws."""
    from verl_r3.quickstart.data import word_problems

    chat = bool(getattr(tokenizer, "chat_template", None))
    return [_prompt_ids(tokenizer, [{"role": "user", "content": p["question"]}] if chat else p["question"],
                        f"generated prompt {i}") for i, p in enumerate(word_problems(count, seed=50_000 + seed))]


def eos_ids(path: str, tokenizer) -> list[int]:
    """Stop tokens: the generation config's EOS ids, else the tokenizer's."""
    import transformers

    try:
        eos = transformers.GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    eos = tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else sorted({eos} if isinstance(eos, int) else set(eos))


