"""The GPU path in one run (one GPU, under 10 minutes): what can only be measured there.

1. equality: AdaBound/AMSBound/RAdam on CUDA (the compiled chunk kernels) against the CPU C kernel on
   a small case, 10 steps of the same gradients: the largest difference;
2. kernel launches per optimizer step, counted by the profiler, for a model-like list of tensors;
3. step time against torch.optim.Adam(fused=True) (one launch per group of tensors): fp32 and bf16
   parameters (bf16 with float32 moments), ~100M and ~1B parameters in Llama-like tensors;
4. train.py in bf16 on a ~125M Llama (configs/125m.yaml's shapes, embedded text), AdaBound against torch's
   fused AdamW, each with ``train.compile`` off and on: tokens/s, MFU (model FLOPs against the GPU's dense
   bf16 peak) and the values read into Python per step (synchronizing CUDA calls inside the Trainer's step,
   counted under ``torch.cuda.set_sync_debug_mode("warn")``);
5. batch growth at a size a CPU cannot reach: configs/50m.yaml on Python sources (this machine's
   site-packages, tokenized by ``bigbatch prepare-data``), the reference batch constant against
   ``batch.schedule: auto`` at the same token budget (as many as fit in ``--budget-s``, >= 50M each):
   eval loss gap and optimizer steps.

    python benchmarks/gpu_check.py [--quick] [--skip-train] [--skip-science]   (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_check.py --device cpu --quick          (the same code path on a CPU, tiny; a test)

On a CPU nothing is CUDA: section 2 counts profiler events, section 3 times fp32 only, MFU and reads per
step print n/a, sections 4 and 5 run tiny models in fp32 (one section-4 run per optimizer, one of them compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def llama_shapes(params: float, d: int, vocab: int = 32000) -> list[tuple[int, ...]]:
    """Tensor shapes of a Llama-like stack with ~``params`` parameters, width ``d`` and ``vocab`` rows."""
    inter = (int(8 * d / 3) + 63) // 64 * 64
    layer = [(d, d)] * 4 + [(inter, d), (inter, d), (d, inter), (d,), (d,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    layers = max(1, round((params - vocab * d) / per_layer))
    return [(vocab, d)] + layer * layers + [(d,)]


def make(shapes, device, dtype, seed=0, *, drawn_on_device=False):
    """Parameters with gradients, drawn on the CPU (the same values on any device) or, faster for a
    billion parameters, on ``device`` itself (``drawn_on_device``)."""
    where = device if drawn_on_device else "cpu"
    gen = torch.Generator(device=where).manual_seed(seed)
    out = []
    for s in shapes:
        p = (torch.randn(s, generator=gen, device=where) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(s, generator=gen, device=where) * 1e-3).to(device=device, dtype=dtype)
        out.append(p)
    return out


def optimizers(dtype):
    from bigbatch.optim import AdaBound, AMSBound, RAdam

    state = {"state_dtype": torch.float32} if dtype != torch.float32 else {}
    return {
        "torch Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-4, fused=True),
        "bigbatch AdaBound": lambda ps: AdaBound(ps, lr=1e-4, **state),
        "bigbatch AMSBound": lambda ps: AMSBound(ps, lr=1e-4, **state),
        "bigbatch RAdam": lambda ps: RAdam(ps, lr=1e-4, **state),
    }


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def equality(device) -> None:
    from bigbatch.optim import AdaBound, AMSBound, RAdam

    print("1. equality with the CPU C kernel (10 steps, 3 tensors, fp32):")
    for cls in (AdaBound, AMSBound, RAdam):
        shapes = [(257, 33), (1000,), (64, 64)]
        cpu, dev = make(shapes, "cpu", torch.float32), make(shapes, device, torch.float32)
        o_cpu, o_dev = cls(cpu, lr=1e-2), cls(dev, lr=1e-2)
        gen = torch.Generator().manual_seed(5)
        for _ in range(10):
            for a, b in zip(cpu, dev):
                g = torch.randn(a.shape, generator=gen)
                a.grad, b.grad = g, g.to(device)
            o_cpu.step()
            o_dev.step()
        diff = max(float((a.detach() - b.detach().cpu()).abs().max()) for a, b in zip(cpu, dev))
        print(f"   {cls.__name__:<9} max |cuda - cpu| = {diff:.3g}")


def launches(device, shapes) -> None:
    from torch.profiler import ProfilerActivity, profile

    print(f"2. kernel launches per step ({len(shapes)} tensors, fp32):")
    for name, mk in optimizers(torch.float32).items():
        ps = make(shapes, device, torch.float32)
        opt = mk(ps)
        for _ in range(3):
            opt.step()
        sync(device)
        acts = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof:
            opt.step()
            sync(device)
        if device == "cuda":
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            print(f"   {name:<18} {len(kernels):5d} kernels")
        else:
            print(f"   {name:<18} (CPU: {len(prof.events())} profiler events; count kernels on a GPU)")


def step_times(device, params_list, steps, vocab: int = 32000, width: int | None = None) -> None:
    print(f"3. step time, median of {steps} steps (ratio to torch Adam fused in the same run):")
    for params in params_list:
        shapes = llama_shapes(params, width or (768 if params < 3e8 else 2048), vocab)
        n = sum(torch.Size(s).numel() for s in shapes)
        # bf16 on a CPU is another kernel (Inductor's C++, minutes to compile per optimizer), not the GPU's
        for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
            times = {}
            for name, mk in optimizers(dtype).items():
                ps = make(shapes, device, dtype, drawn_on_device=True)
                opt = mk(ps)
                for _ in range(3):  # compile, first allocations
                    opt.step()
                sync(device)
                ts = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    opt.step()
                    sync(device)
                    ts.append(time.perf_counter() - t0)
                times[name] = statistics.median(ts) * 1e3
                del opt, ps
                if device == "cuda":
                    torch.cuda.empty_cache()
            ref = times["torch Adam fused"]
            row = ", ".join(f"{k.split()[-1]} {v:.2f} ms ({v / ref:.2f}x)" for k, v in times.items())
            print(f"   {n / 1e6:6.0f}M params, {len(shapes)} tensors, {str(dtype)[6:]:<8}: {row}")


# ------------------------------------------------------------------ train.py runs (sections 4 and 5)

WORK = Path("/tmp/bigbatch-gpu-check")
SYNC_TEXT = "synchronizing CUDA operation"  # the warning of torch.cuda.set_sync_debug_mode("warn")
LOG = ["--logging.progress", "none", "--logging.plot", "false", "--logging.tensorboard", "false",
       "--checkpoint.at_end", "false", "--overwrite"]


def train_child(counts_path: str, argv: list[str]) -> int:
    """train.py's main in this process, counting each step's synchronizing CUDA calls (the values read
    into Python) with ``torch.cuda.set_sync_debug_mode("warn")``, which is on only inside
    ``Trainer._step`` (one optimizer step): the reads at sync points (log steps) are not counted. The counts, one per
    step, go to ``counts_path`` (JSON)."""
    import importlib.util
    import warnings

    from bigbatch.training.loop import Trainer

    cuda = torch.cuda.is_available()
    counts: list[int] = []
    step = Trainer._step

    def counted(self, *args):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                return step(self, *args)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
                counts.append(sum(SYNC_TEXT in str(w.message) for w in seen))

    Trainer._step = counted
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    rc = train.main(argv)
    Path(counts_path).write_text(json.dumps(counts))
    return rc


def launch(name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
    """A train.py run of ``argv`` in ``WORK/name`` through :func:`train_child`, started (not waited for)."""
    out = WORK / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--train-child", str(WORK / f"{name}.reads.json"), "--",
           *argv, "--out", str(out), *LOG]
    log = open(WORK / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), out


def finish(name: str, proc: subprocess.Popen, out: Path) -> dict | None:
    """The run's records and per-step reads once it ends; None (and its log's tail) if it failed."""
    rc = proc.wait()
    if rc != 0:
        tail = (WORK / f"{name}.log").read_text()[-2000:]
        print(f"   {name}: train.py failed ({rc}):\n{tail}")
        return None
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    reads = json.loads((WORK / f"{name}.reads.json").read_text())
    return {"train": [r for r in recs if r["kind"] == "train"], "eval": [r for r in recs if r["kind"] == "eval"],
            "changes": [r for r in recs if r["kind"] == "batch_change"], "reads": reads, "out": out}


def flops_per_token(out: Path, seq_len: int) -> float:
    """Training FLOPs per token of the run's model (``out/hf_config.json``, built on the meta device), as
    the train records' ``mfu`` counts them (:func:`bigbatch.training.flops.flops_per_token`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bigbatch.training import flops

    fields = json.loads((out / "hf_config.json").read_text())
    conf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    return flops.flops_per_token(model, seq_len)


def peak_flops(device: str) -> float | None:
    """The GPU's dense bf16 peak (FLOP/s) from :data:`bigbatch.training.flops.PEAK_TFLOPS`."""
    from bigbatch.training import flops

    if device != "cuda":
        return None
    peak = flops.device_peak_tflops(torch.device("cuda"), "bf16")
    return None if peak is None else peak * 1e12


def train_matrix(device: str, quick: bool, steps: int) -> list[dict]:
    """Section 4: train.py on a ~125M Llama in bf16 (configs/125m.yaml's shapes on the embedded corpus),
    AdaBound against torch's fused AdamW, each with ``train.compile`` off and on: tokens/s (median of
    the records after the first two: compilation excluded), MFU and values read per step."""
    if quick:  # the same code path at tiny sizes on a CPU: one run per optimizer, one of them compiled
        size = ["--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "2",
                "--model.intermediate_size", "128", "--tokenizer.vocab_size", "512", "--data.embedded", "pydoc",
                "--data.max_chars", "300000", "--data.seq_len", "64", "--batch.global_batch", "8",
                "--batch.micro_batch_sizes", "[4]", "--deepspeed.precision", "fp32", "--train.log_every", "1",
                "--train.threads", "1"]
        cases = [("AdaBound", False), ("AdamW (torch fused)", True)]
    else:
        size = ["--tokenizer.vocab_size", "32000", "--data.seq_len", "1024", "--batch.global_batch", "32",
                "--batch.micro_batch_sizes", "[16, 8]", "--deepspeed.precision", "bf16", "--train.log_every", "5"]
        cases = [(o, c) for o in ("AdaBound", "AdamW (torch fused)") for c in (False, True)]
    base = ["--config", "configs/125m.yaml", "--data.source", "embedded", "--tokenizer.kind", "bpe",
            "--data.num_proc", "1", "--data.cache_dir", str(WORK / "cache"), "--train.max_steps", str(steps),
            "--train.eval_every", "0", "--train.eval_blocks", "8", "--deepspeed.config", "null",
            "--deepspeed.zero_stage", "1", *size]
    flags = {"AdaBound": ["--optim.name", "adabound", "--optim.hparams.final_lr", "1.8", "--optim.hparams.gamma",
                          "1e-3"],  # the config's lr, betas, eps and decay; bounds by the rule in its comment
             "AdamW (torch fused)": ["--optim.name", "adamw", "--optim.kwargs", "{fused: true}"]}
    print(f"4. train.py, configs/125m.yaml shapes{' (tiny sizes: --quick)' if quick else ''}, {steps} steps, "
          f"embedded text, {'bf16' if not quick else 'fp32'}, ZeRO-1, one {device}:")
    peak = peak_flops(device)
    rows = []
    for opt, compiled in cases:  # one at a time: each has the device to itself
        name = f"{opt.split()[0].lower()}-{'compiled' if compiled else 'eager'}"
        argv = [*base, *flags[opt], "--train.compile", str(compiled).lower()]
        res = finish(name, *launch(name, argv))
        if res is None:
            continue
        recs = res["train"]
        rate = statistics.median(r["tokens_per_s"] for r in recs[2:] or recs)
        seq = int(recs[0]["tokens"] // recs[0]["samples"])
        flops = flops_per_token(res["out"], seq)
        mfu = rate * flops / peak if peak else None
        reads = res["reads"]
        if len(reads) != recs[-1]["step"]:
            print(f"   {name}: the reads of {len(reads)} steps were counted, of {recs[-1]['step']}")
        rows.append({"optimizer": opt, "compile": compiled, "tokens_per_s": rate, "mfu": mfu, "flops": flops,
                     "reads_per_step": statistics.median(reads[2:] or reads) if device == "cuda" else None,
                     "reads_first_step": reads[0] if device == "cuda" else None})
    print(f"   {'optimizer':<20} {'compile':>7} {'tokens/s':>12} {'GFLOP/token':>11} {'MFU':>6} {'reads/step':>11} "
          f"{'(1st step)':>10}")
    for r in rows:
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else "   n/a"
        reads = f"{r['reads_per_step']:11.0f} {r['reads_first_step']:10d}" if r["reads_per_step"] is not None \
            else f"{'n/a (cpu)':>11} {'':>10}"
        print(f"   {r['optimizer']:<20} {str(r['compile']).lower():>7} {r['tokens_per_s']:12,.0f} {r['flops'] / 1e9:11.3f} "
              f"{mfu} {reads}")
    by = {(r["optimizer"].split()[0], r["compile"]): r["tokens_per_s"] for r in rows}
    for c in (False, True):
        if ("AdaBound", c) in by and ("AdamW", c) in by:
            print(f"   AdaBound / AdamW tokens/s, compile {str(c).lower()}: {by['AdaBound', c] / by['AdamW', c]:.3f}")
    for o in ("AdaBound", "AdamW"):
        if (o, True) in by and (o, False) in by:
            print(f"   {o} compiled / eager tokens/s: {by[o, True] / by[o, False]:.3f}")
    return rows


def science_tokens(rows: list[dict], seconds_left: float, least: int = 50_000_000) -> int:
    """Tokens per section-5 run that fit in ``seconds_left``: the two runs share the device, and a token of
    the 55M model costs about half the FLOPs of the 125M's (370M against 860M), so each runs at about the
    rate of section 4's compiled AdaBound; 150 s go to preparing the corpus, starting and compiling. At
    least ``least``."""
    rate = next((r["tokens_per_s"] for r in rows if r["optimizer"] == "AdaBound" and r["compile"]), 0.0)
    return max(least, int(rate * max(0.0, seconds_left - 150) / 1e6) * 1_000_000)


def code_corpus(path: Path, max_chars: int) -> int:
    """JSON Lines of Python sources, one file per document, from this interpreter's site-packages (the
    GPU image holds hundreds of MB: torch, jax, transformers, scipy, ...), up to ``max_chars``
    characters; returns the characters written."""
    import site

    roots = sorted({p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)})
    total = 0
    with open(path, "w") as fh:
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    if not name.endswith(".py"):
                        continue
                    try:
                        text = open(os.path.join(dirpath, name), encoding="utf-8").read()
                    except (OSError, UnicodeDecodeError):
                        continue
                    if text.strip():
                        fh.write(json.dumps({"text": text}) + "\n")
                        total += len(text)
                    if total >= max_chars:
                        return total
    return total


def science(device: str, quick: bool, tokens: int) -> list[dict]:
    """Section 5: batch growth at a size a CPU cannot reach: configs/50m.yaml (~55M Llama, bf16, compiled;
    ``quick``: tiny, fp32, eager) on Python sources prepared with ``bigbatch prepare-data``, the reference
    batch constant against ``batch.schedule: auto`` from it, ``tokens`` each, both runs at once on the one
    device: final eval loss, its gap, optimizer steps, the batches gone through."""
    WORK.mkdir(parents=True, exist_ok=True)
    chars = code_corpus(WORK / "code.jsonl", 1_500_000 if quick else 400_000_000)
    prep = WORK / "prep"
    shutil.rmtree(prep, ignore_errors=True)
    data_cfg = {"tokenizer": {"kind": "bpe", "vocab_size": 512 if quick else 8192},
                "data": {"cache_dir": str(WORK / "cache"), "workers": 2 if quick else 16,
                         "shard_bytes": 2_000_000 if quick else 32_000_000,
                         "sources": [{"name": "stdlib", "kind": "embedded", "max_chars": 4_000_000},
                                     {"name": "code", "kind": "json", "files": [str(WORK / "code.jsonl")]}]}}
    (WORK / "data.yaml").write_text(json.dumps(data_cfg))  # JSON is YAML
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bigbatch.cli", "prepare-data", "--config",
                           str(WORK / "data.yaml"), "--out", str(prep)], cwd=REPO, env=env, capture_output=True,
                          text=True)
    manifest = prep / "code" / "manifest.json"
    if proc.returncode != 0 or not manifest.is_file():
        print(f"5. prepare-data failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return []
    corpus_tokens = json.loads(manifest.read_text())["tokens"]
    ref, top = (8, 32) if quick else (64, 512)
    base = ["--config", "configs/50m.yaml", "--data.source", "prepared", "--data.prepared", f"[{{path: {prep}/code}}]",
            "--tokenizer.vocab_size", str(data_cfg["tokenizer"]["vocab_size"]), "--train.tokens", str(tokens),
            "--train.compile", str(not quick).lower(), "--train.eval_every", "0"]
    if quick:  # eager: section 4 compiled the same blocks already
        base += ["--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "2",
                 "--model.intermediate_size", "128", "--data.seq_len", "64", "--batch.reference_global_batch",
                 str(ref), "--batch.micro_batch_sizes", "[8, 4]", "--deepspeed.precision", "fp32",
                 "--schedule.warmup_tokens", "8192", "--batch.growth_patience", "2", "--train.log_every", "2",
                 "--train.eval_blocks", "16", "--train.threads", "1"]
    arms = {"constant": ["--batch.global_batch", str(ref)],
            "auto": ["--batch.schedule", "auto", "--batch.min_global_batch", str(ref),
                     "--batch.max_global_batch", str(top)]}
    print(f"5. batch growth, configs/50m.yaml{' (tiny sizes: --quick)' if quick else ''}: {tokens:,} tokens each "
          f"of a {corpus_tokens:,}-token corpus ({chars / 1e6:.0f}M chars of Python sources, prepared in "
          f"{time.perf_counter() - t0:.0f} s); batch {ref} constant against auto {ref} -> {top}, both at once:")
    started = {name: launch(f"science-{name}", base + extra) for name, extra in arms.items()}
    results = {name: finish(f"science-{name}", *p) for name, p in started.items()}
    rows = []
    for name, res in results.items():
        if res is None:
            continue
        t = res["train"]
        batches = [t[0]["global_batch"]] + [c["global_batch"] for c in res["changes"]]
        rows.append({"run": name, "tokens": t[-1]["tokens"], "steps": t[-1]["step"],
                     "eval_loss": res["eval"][-1]["eval_loss"], "batches": batches,
                     "grew_at_tokens": [c["tokens"] for c in res["changes"]],
                     "noise_scale": t[-1].get("noise_scale")})
    base_row = next((r for r in rows if r["run"] == "constant"), None)
    print(f"   {'run':<9} {'tokens':>12} {'steps':>7} {'eval loss':>10} {'gap':>8} {'steps saved':>12}  batches")
    for r in rows:
        gap = r["eval_loss"] / base_row["eval_loss"] - 1 if base_row else float("nan")
        saved = 1 - r["steps"] / base_row["steps"] if base_row else float("nan")
        print(f"   {r['run']:<9} {r['tokens']:12,} {r['steps']:7d} {r['eval_loss']:10.4f} {gap:+8.2%} {saved:12.1%}  "
              f"{' -> '.join(map(str, r['batches']))}")
    return rows


def main() -> None:
    if sys.argv[1:2] == ["--train-child"]:  # gpu_check.py --train-child COUNTS.json -- TRAIN.PY ARGS
        sys.exit(train_child(sys.argv[2], sys.argv[4:]))
    global WORK
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a dry run of the code path)")
    p.add_argument("--skip-train", action="store_true", help="no train.py runs (sections 4 and 5)")
    p.add_argument("--skip-science", action="store_true", help="no batch-growth runs (section 5)")
    p.add_argument("--train-steps", type=int, default=None, help="steps of each section-4 run (30; --quick 6)")
    p.add_argument("--science-tokens", type=int, default=None,
                   help="tokens of each section-5 run (default: what fits in --budget-s, >= 50M; --quick 30k)")
    p.add_argument("--budget-s", type=float, default=560, help="seconds the whole check may take (sets the default "
                   "--science-tokens)")
    p.add_argument("--work", default=str(WORK), help="runs, logs and the prepared corpus (replaced)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here")
    WORK = Path(args.work)
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}")
    equality(args.device)
    if args.quick:
        launches(args.device, llama_shapes(2e6, 128, 1000))
        step_times(args.device, [2e6], 3, vocab=1000, width=128)
    else:
        launches(args.device, llama_shapes(1e8, 768))
        step_times(args.device, [1e8, 1e9], 10)
    print(f"   ({time.perf_counter() - t0:.0f} s so far)")
    if not args.skip_train:
        rows = train_matrix(args.device, args.quick, args.train_steps or (6 if args.quick else 30))
        print(f"   ({time.perf_counter() - t0:.0f} s so far)")
        if not args.skip_science:
            tokens = args.science_tokens or (30_000 if args.quick else
                                             science_tokens(rows, args.budget_s - (time.perf_counter() - t0)))
            science(args.device, args.quick, tokens)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
