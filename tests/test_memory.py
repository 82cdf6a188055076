"""Bounded memory for any K: a train step's peak memory does not grow with K (issue: annealing K from n_ov)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, resource, sys, torch
import hf_lorsa.model.modeling_lorsa as M
from hf_lorsa import LorsaConfig, LorsaModel
torch.manual_seed(0)
k, naive, act_fn = int(sys.argv[1]), sys.argv[2] == "naive", sys.argv[3]
if naive:  # a decode that materialises the K selected rows of w_o for every token: N x K x D floats
    M.LorsaModel.decode = lambda self, v, i: (v[..., None] * self.w_o[i]).sum(-2) + self.b_D
lorsa = LorsaModel(LorsaConfig(d_model=256, n_qk_heads=64, d_qk_head=64, n_ov_heads=4096, top_k=16, act_fn=act_fn))
lorsa.train()
x = torch.randn(2, 256, 256)
lorsa(x, top_k=16).reconstruction.sum().backward()  # everything allocated once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = lorsa(x, top_k=k)
(out.reconstruction.square().mean()).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mib": (after - before) / 1024}))
"""


def extra_memory_mib(k: int, decode: str = "lorsa", act_fn: str = "topk") -> float:
    """Peak memory (MiB) a forward + backward at K adds over one at K = 16, in a fresh process."""
    command = [sys.executable, "-c", PROBE, str(k), decode, act_fn]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])["extra_mib"]


def test_a_step_at_k_equal_n_ov_needs_no_more_than_tokens_times_heads():
    # 512 tokens x 4096 heads: one (N, Hov) float32 matrix is 8 MiB; K = 4096 rows of w_o per token would be
    # N x K x D floats, 2 GiB. The measured extra stays within a few (N, Hov) matrices (z, top-k values and
    # indices, the dense decode).
    extra = extra_memory_mib(4096)
    assert extra < 160, extra
    assert extra_memory_mib(4096, "naive") > 1500  # the probe sees an O(N x K x D) decode


def test_batch_top_k_stays_within_the_same_bound_while_k_anneals():
    # K = 1024: BatchTopK keeps room for 4K = 4096 heads per position and ranks N x 4096 scores for the batch's bar
    extra = extra_memory_mib(1024, act_fn="batchtopk")
    assert extra < 160, extra


ANALYSIS_PROBE = """
import json, re, sys
from datasets import load_dataset
from hf_lorsa import LorsaModel
from hf_lorsa.analysis import head_statistics
from hf_lorsa.analysis.analysis import analyze
from hf_lorsa.embedded import STORIES_MODEL, STORIES_TEXT
from hf_lorsa.inputs.activations import pack
from hf_lorsa.inputs.loading import host_and_tokenizer
head_statistics.CoFiring.__init__.__defaults__ = (2048,)  # pairs counted over 2K positions, not 20K: a short test
model, tokenizer = host_and_tokenizer(str(STORIES_MODEL), None, "float32", "cpu")
windows = pack(load_dataset("json", data_files=str(STORIES_TEXT), split="train"), tokenizer, 256)
lorsa = LorsaModel.from_host(model, 2, n_ov_heads=int(sys.argv[2]), top_k=16)
lorsa.config.skip_token_ids = [1]
def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
extra = []
for tokens in sys.argv[3:]:
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from what is resident now
    start = status("VmRSS")
    table = analyze(model, lorsa, windows, int(tokens), tokenizer=tokenizer, progress=False)
    assert len(table) == lorsa.config.n_ov_heads
    extra.append(status("VmHWM") - start)
print(json.dumps(extra))
"""
# glibc's fixed thresholds: freed blocks go back at once, so the peak is what was alive (no reuse noise)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}


def analysis_memory_mib(heads: int, *tokens: int) -> list[float]:
    """Peak memory (MiB) each analysis of `tokens[i]` tokens adds over what was resident when it began, in one fresh
    process (Linux: the peak is reset through /proc/self/clear_refs before each)."""
    command = [sys.executable, "-c", ANALYSIS_PROBE, "-", str(heads), *map(str, tokens)]
    run = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **MALLOC})
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_analysis_memory_grows_with_heads_not_with_tokens():
    # What an analysis keeps is per head (its top and sampled events, histogram, contexts), plus the co-firing pairs
    # of the first positions: an analysis of 4x the tokens peaks no higher than one of as many tokens as the first
    # (after it, so that both find everything imported), while one of 8x the heads peaks higher.
    # BENCHMARKS "Analysis memory" has 16,384 heads over 1M tokens.
    _, few, many = analysis_memory_mib(256, 4096, 4096, 16_384)
    assert many < few + 20, (few, many)
    _, more_heads = analysis_memory_mib(2048, 4096, 4096)
    assert more_heads > few + 100, (few, more_heads)  # the probe sees what does grow (8x the heads)


CALIBRATION_PROBE = """
import json, re, sys, torch
from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.model.initialization import calibrate
def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
torch.manual_seed(0)
lorsa = LorsaModel(LorsaConfig(d_model=256, n_qk_heads=64, d_qk_head=64, n_ov_heads=4096, top_k=16))
x, y = torch.randn(32, 256, 256), torch.randn(32, 256, 256)
counted = torch.ones(32, 256, dtype=torch.bool)
calibrate(lorsa, x[:1], y[:1], counted[:1], 4096)  # everything imported and allocated once
extra = []
for chunk in sys.argv[1:]:
    open("/proc/self/clear_refs", "w").write("5")
    start = status("VmRSS")
    calibrate(lorsa, x, y, counted, 4096, chunk=int(chunk))
    extra.append(status("VmHWM") - start)
print(json.dumps(extra))
"""


def test_calibration_at_k_equal_n_ov_reads_its_positions_by_chunks():
    # 8,192 positions x 4,096 heads at K = n_ov: one (N, Hov) float32 matrix is 128 MiB, and a pass over every position
    # at once holds several (672 MiB measured); by chunks of 2,048 positions a quarter of that (186-189 MiB)
    command = [sys.executable, "-c", CALIBRATION_PROBE, "2048", str(10**9)]
    run = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **MALLOC})
    chunked, at_once = json.loads(run.stdout.strip().splitlines()[-1])
    assert chunked < 300, chunked
    assert at_once > 2 * chunked, (chunked, at_once)  # the probe sees what a pass over every position costs
