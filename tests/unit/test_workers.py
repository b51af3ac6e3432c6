"""Worker profiles (parsing, FILE:LINE errors, the vLLM command line) and the tiny-model builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers import profile, tiny_model

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "fixtures" / "workers"


def test_the_local_profiles_load_and_name_the_policys_models() -> None:
    from gateway.policy import load

    table = profile.load(ROOT / "policies" / "local.workers.yaml")
    policy = load(ROOT / "policies" / "local.yaml")
    assert set(table) == set(policy.tiers)
    for name, p in table.items():
        assert p.name == policy.tiers[name].model
        assert p.max_model_len == policy.tiers[name].max_context
        assert p.tiny_model == name
    assert profile.beside("policies/local.yaml") == Path("policies/local.workers.yaml")


def test_vllm_arguments() -> None:
    text = """
version: 1
tiers:
  frontier:
    model: Qwen/Qwen2.5-7B-Instruct
    served_model_name: frontier-7b
    max_model_len: 8192
    dtype: bfloat16
    tensor_parallel_size: 2
    gpu_memory_utilization: 0.85
    extra_args: [--enable-prefix-caching, --max-num-seqs, 64]
    env: {VLLM_LOGGING_LEVEL: WARNING, OMP_NUM_THREADS: 4}
"""
    p = profile.parse(text, "w.yaml")["frontier"]
    assert p.vllm_args(host="0.0.0.0", port=8000) == [
        "--model", "Qwen/Qwen2.5-7B-Instruct", "--host", "0.0.0.0", "--port", "8000", "--dtype", "bfloat16",
        "--served-model-name", "frontier-7b", "--max-model-len", "8192", "--tensor-parallel-size", "2",
        "--gpu-memory-utilization", "0.85", "--enable-prefix-caching", "--max-num-seqs", "64",
    ]  # fmt: skip
    assert p.env == {"VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "4"}
    minimal = profile.parse("version: 1\ntiers:\n  t: {model: /m}\n", "w.yaml")["t"]
    assert minimal.vllm_args(host="127.0.0.1", port=1) == [
        "--model", "/m", "--host", "127.0.0.1", "--port", "1", "--dtype", "auto"
    ]  # fmt: skip
    assert minimal.name == "/m"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "bad_fields.yaml",
            [
                "4: tiers.small.model: must not be empty",
                "5: tiers.small.max_model_len: must be at least 16",
                "6: tiers.small.dtype: expected one of auto, half, float16, bfloat16, float, float32, got 'float8'",
                "7: tiers.small.tensor_parallel_size: must be at least 1",
                "8: tiers.small.gpu_memory_utilization: must be greater than 0 and at most 1",
                "9: tiers.small.extra_args[0]: --port is set by the launcher",
                "12: tiers.frontier: unknown field 'colour'",
            ],
        ),
        (
            "bad_top.yaml",
            [
                "1: version: unsupported version 2 (supported: 1)",
                "2: tiers: expected object, got array",
                "3: unknown field 'policy'",
            ],
        ),
        (
            "bad_yaml.yaml",
            ["3: invalid YAML: while parsing a flow mapping, expected ',' or '}', but got '<stream end>'"],
        ),
    ],
)
def test_bad_profiles_are_refused_with_file_and_line(name: str, expected: list[str]) -> None:
    with pytest.raises(profile.ProfileError) as exc:
        profile.load(BAD / name)
    assert exc.value.problems == [f"{BAD / name}:{e}" for e in expected]


def test_missing_profile_file() -> None:
    with pytest.raises(profile.ProfileError, match=r"nope\.yaml:1: cannot read worker profiles"):
        profile.load(BAD / "nope.yaml")


@pytest.mark.vllm  # needs transformers/torch (the cpu-worker extra), like the vLLM tests; not in test-fast
def test_tiny_model_is_deterministic_and_serves_any_text(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    a = tiny_model.build(tmp_path / "a", "small")
    b = tiny_model.build(tmp_path / "b", "small")
    c = tiny_model.build(tmp_path / "c", "frontier")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert tiny_model.is_built(a) and not tiny_model.is_built(tmp_path / "nothing")
    assert json.loads((a / tiny_model.MARKER).read_text())["weights"] == "random"

    small, frontier = AutoConfig.from_pretrained(a), AutoConfig.from_pretrained(c)
    assert small.hidden_size // small.num_attention_heads == 64  # CPU attention refuses 16
    assert (small.max_position_embeddings, frontier.max_position_embeddings) == (4096, 32768)
    assert frontier.num_hidden_layers > small.num_hidden_layers

    tok = AutoTokenizer.from_pretrained(a)
    text = "Summarize: Café prices rose 3.5% — 東京 📈"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: nothing is unknown
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>user: hi\nassistant: "
