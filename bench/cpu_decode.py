"""One greedy stream of the embedded model on the CPU: kvmesh's engine against transformers'
``generate()`` on the same GGUF, each in a fresh process, run in turn (A B A B ...).

Both decode the same chat prompt greedily for ``--tokens`` tokens (EOS ignored) with the same
thread count. Decode speed is measured from the first token to the last (prefill excluded);
resident memory is the process's own after the run. Prints one table of medians.

    python bench/cpu_decode.py                       # 3 rounds, 128 tokens, 2 threads
    python bench/cpu_decode.py --rounds 5 --tokens 256 --threads 1
    python bench/cpu_decode.py --one kvmesh          # a single measurement, as JSON
    python bench/cpu_decode.py --layouts 1 --threads 1   # weight layouts: CPU ms of the model's products
    git archive OLD | tar -x -C /tmp/old && python bench/cpu_decode.py --tree /tmp/old   # and an older kvmesh
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper."


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure_kvmesh(tokens: int) -> dict:
    from kvmesh.worker import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM("default")
    load_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    prompt = llm.encode_chat([{"role": "user", "content": PROMPT}])
    engine = llm.engine
    seq = engine.make_sequence("bench", prompt, params)
    engine.add(seq)
    times, cpu = [], []
    while engine.has_work():
        engine.step()
        times.append(time.perf_counter())
        cpu.append(time.process_time())
    return {
        "load_s": load_s,
        "prompt_tokens": len(prompt),
        "token_times": times,
        "cpu_times": cpu,
        "token_ids": seq.token_ids[len(prompt) :],
    }


def measure_transformers(tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from kvmesh.models import default_gguf_path

    gguf = default_gguf_path()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    load_s = time.perf_counter() - start
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    times: list[float] = []
    cpu: list[float] = []

    class Clock(TextStreamer):  # put() is called once with the prompt, then once per new token
        def put(self, value):
            times.append(time.perf_counter())
            cpu.append(time.process_time())

        def end(self):
            pass

    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=4, **greedy)  # warm-up
        out = model.generate(
            prompt, max_new_tokens=tokens, min_new_tokens=tokens, streamer=Clock(tokenizer), **greedy
        )
    return {
        "load_s": load_s,
        "prompt_tokens": int(prompt.shape[1]),
        "token_times": times[1:],
        "cpu_times": cpu[1:],
        "token_ids": out[0, prompt.shape[1] :].tolist(),
    }


# SmolLM2-135M's projections: hidden 576, 30 layers, 9 query and 3 KV heads of 64, intermediate 1536,
# vocabulary 49152 (qkv, o, gate/up, down per layer, then the LM head).
MODEL_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def measure_layouts(threads: int, rows: int, passes: int = 9) -> dict:
    """CPU milliseconds of one ``F.linear`` per weight matrix of the embedded model's shapes (random
    values) on ``rows`` input rows: weights in the ``[out, in]`` layout, then the same weights stored
    transposed, as kvmesh keeps them on the CPU (layers.store_linear_weights_transposed_); passes
    alternate the two, medians. Together the weights outsize the last-level cache, as in decode."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    plain = [torch.randn(shape, generator=gen) * 0.02 for shape in MODEL_SHAPES]
    transposed = [w.t().contiguous().t() for w in plain]
    inputs = {k: torch.randn(rows, k, generator=gen) for k in (576, 1536)}
    times: dict[str, list[float]] = {"out_in_ms": [], "transposed_ms": []}
    with torch.inference_mode():
        for _ in range(passes):
            for name, weights in (("out_in_ms", plain), ("transposed_ms", transposed)):
                start = time.process_time()
                for w in weights:
                    F.linear(inputs[w.shape[1]], w)
                times[name].append((time.process_time() - start) * 1000)
        diff = max(
            float((F.linear(inputs[a.shape[1]], a) - F.linear(inputs[b.shape[1]], b)).abs().max())
            for a, b in zip(plain, transposed)
        )
    result: dict = {name: statistics.median(ts) for name, ts in times.items()}
    result.update(rows=rows, threads=threads, passes=passes, max_abs_difference=diff)
    return result


def one(engine: str, tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    result = (measure_kvmesh if engine == "kvmesh" else measure_transformers)(tokens)
    times, cpu = result.pop("token_times"), result.pop("cpu_times")
    result["decode_tok_s"] = (len(times) - 1) / (times[-1] - times[0])
    # CPU time per token (all threads): what a token costs, little moved by other processes.
    result["cpu_ms_per_token"] = (cpu[-1] - cpu[0]) / (len(cpu) - 1) * 1000
    result["tokens"] = len(times)
    result["rss_mib"], result["peak_rss_mib"] = rss_mib()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", choices=["kvmesh", "transformers"], help="measure once, print JSON")
    parser.add_argument("--tree", type=Path, help="also measure this checkout's kvmesh (an older commit)")
    parser.add_argument(
        "--layouts", type=int, metavar="ROWS", help="time the model's matrix products in both weight layouts"
    )
    args = parser.parse_args()
    if args.layouts:
        print(json.dumps(measure_layouts(args.threads, args.layouts)))
        return
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.threads)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    runs: dict[str, list[dict]] = {"kvmesh": [], "transformers": []}
    if args.tree:
        runs[f"kvmesh {args.tree.name}"] = []
    for _ in range(args.rounds):
        for name in runs:
            engine = "transformers" if name == "transformers" else "kvmesh"
            cmd = [sys.executable, __file__, "--one", engine, "--tokens", str(args.tokens)]
            cmd += ["--threads", str(args.threads)]
            tree = dict(env, PYTHONPATH=str(args.tree.resolve())) if name.startswith("kvmesh ") else env
            out = subprocess.run(cmd, env=tree, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    report(runs, args.rounds, args.tokens, args.threads)


def report(runs: dict[str, list[dict]], rounds: int, tokens: int, threads: int) -> None:
    """One table of medians. 'vs HF' is the median of the rounds' own ratios (each round's runs
    follow one another, so a slow spell of the machine moves both sides of a ratio); 'same tokens'
    says whether every run generated exactly transformers' tokens."""
    hf = runs["transformers"]
    reference = hf[0]["token_ids"]
    print(f"{rounds} rounds, {tokens} greedy tokens, {threads} threads, medians")
    print(f"{'engine':<18}{'decode tok/s':>14}{'min..max':>16}{'vs HF':>8}{'CPU ms/token':>14}{'RSS MiB':>10}"
          f"{'peak MiB':>10}{'load s':>8}  same tokens")  # fmt: skip
    for engine, rs in runs.items():
        speeds = [r["decode_tok_s"] for r in rs]
        ratio = statistics.median(r["decode_tok_s"] / h["decode_tok_s"] for r, h in zip(rs, hf))
        same = _first_difference(reference, [r["token_ids"] for r in rs])
        print(
            f"{engine:<18}{statistics.median(speeds):>14.1f}{f'{min(speeds):.1f}..{max(speeds):.1f}':>16}"
            f"{ratio:>8.2f}"
            f"{statistics.median(r['cpu_ms_per_token'] for r in rs):>14.1f}"
            f"{statistics.median(r['rss_mib'] for r in rs):>10.0f}"
            f"{statistics.median(r['peak_rss_mib'] for r in rs):>10.0f}"
            f"{statistics.median(r['load_s'] for r in rs):>8.1f}  {same}"
        )


def _first_difference(reference: list[int], runs: list[list[int]]) -> str:
    for ids in runs:
        if ids != reference:
            at = next(
                (i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), min(len(ids), len(reference))
            )
            return f"no (token {at})"
    return "yes"


if __name__ == "__main__":
    main()
