"""Tiny random host models of every supported family, built offline from configs, and shared paths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Under pytest-xdist the workers share the machine's cores: each worker, and every process a test starts from it,
# gets its share of threads (set before torch is imported), instead of all of them oversubscribing every core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# The command line's parser snapshots (hf_lorsa.base.parser_snapshot) go to a folder of this test session, not home.
os.environ.setdefault("HF_LORSA_CACHE", tempfile.mkdtemp(prefix="hf-lorsa-cache-"))

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # only for SmolLM2 and the authors' benchmark: stories260K ships in the package
STORIES_MODEL = ROOT / "src" / "hf_lorsa" / "embedded" / "stories260K"
STORIES_DATA = ROOT / "src" / "hf_lorsa" / "embedded" / "stories260K-stories.jsonl"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct-q4"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Sequences in the tests are 24 tokens long, longer than every sliding window below.
COMMON = dict(
    bos_token_id=1,
    eos_token_id=2,
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
)
LLAMA_LIKE = dict(COMMON, intermediate_size=48, num_key_value_heads=2)
FAMILIES: dict[str, dict] = {
    "llama": dict(LLAMA_LIKE, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "mistral": dict(LLAMA_LIKE, sliding_window=6),
    "qwen2": dict(LLAMA_LIKE, use_sliding_window=True, sliding_window=5, max_window_layers=1, attention_bias=True),
    "qwen3": dict(LLAMA_LIKE, head_dim=16, use_sliding_window=False),
    "gemma2": dict(LLAMA_LIKE, head_dim=8, sliding_window=5, query_pre_attn_scalar=12, attn_logit_softcapping=3.0),
    "gemma3_text": dict(LLAMA_LIKE, head_dim=8, sliding_window=5, query_pre_attn_scalar=12, sliding_window_pattern=2),
    "phi3": dict(LLAMA_LIKE, sliding_window=7, partial_rotary_factor=0.5, pad_token_id=0),
    "gpt2": dict(bos_token_id=1, eos_token_id=2, vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": dict(COMMON, intermediate_size=48, rotary_pct=0.5, use_parallel_residual=True),
}


def build_host(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM of `family` with non-trivial norm weights, in eval mode."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **FAMILIES[family])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:  # random norm scales, so that norms are really exercised
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(std=0.05)
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def token_batch(vocab: int = 97, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def require_shared(*paths: Path) -> None:
    """Skip when the files of ../shared a test names are absent (a user's clone); CI sets HF_LORSA_REQUIRE_SHARED so
    it fails instead. The embedded stories260K host and corpus are always there."""
    needed = (STORIES_MODEL, STORIES_DATA, *paths)
    if all(p.exists() for p in needed):
        return
    message = f"needs the shared files {[str(p) for p in needed if not p.exists()]}"
    if os.environ.get("HF_LORSA_REQUIRE_SHARED"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def stories_model():
    require_shared()
    return AutoModelForCausalLM.from_pretrained(STORIES_MODEL).eval()


@pytest.fixture(scope="session")
def stories_tokenizer():
    require_shared()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES_MODEL)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(port: int, process, seconds: int = 240) -> str:
    """The Gradio app's /config page once it serves, or "" when the process ends or time runs out first."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2).read().decode()
        except OSError:
            time.sleep(1)
    return ""
