"""Batch-size schedules on the tiny Transformer: the same token budget at (a) the reference batch, (b) a
4x batch from the start with the scaling rules, (c) a fixed ramp and (d) the automatic schedule that
follows the measured gradient noise scale, for AdaBound, AdamW and RAdam, under a cosine or a WSD
learning-rate schedule.

Every run is train.py itself (``torchrun --nproc_per_node N train.py --config configs/tiny.yaml``),
so the numbers are the product's. Printed per optimizer and token budget: final eval loss, its gap
to (a), the optimizer steps and their reduction against (a), the batches the run went through, and
the noise scale (a) measured along the way. Goal: (d) within 1% of (a)'s eval loss with
>= 30% fewer steps at 800k tokens and >= 50% fewer at 3M. Plots eval loss, global batch and noise
scale against tokens (``OUT/batch_schedule_<tokens>_<N>p_<lr schedule>.png``); ``OUT/results.json`` holds every row.

``--noise-cost`` instead measures what measuring the noise scale at every step costs: the reference
run with and without it, alternated ``--repeats`` times, tokens/s of each (median).

    python benchmarks/batch_schedule.py [--tokens 800000 3000000] [--optimizers adabound adamw radam]
        [--nproc 1|2] [--lr-schedule cosine|wsd] [--cases a_ref16 d_auto] [--out DIR] [-- --batch.beta_form keep_beta1]
    python benchmarks/batch_schedule.py --noise-cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigbatch.atomic import write_text  # noqa: E402
from bigbatch.training.metrics import pyplot, save_png  # noqa: E402
from benchmarks.tiny_runs import ADAM_HPARAMS, run_train  # noqa: E402

OPTIMIZERS = {
    "adabound": [],  # configs/tiny.yaml's optimizer and hyperparameters
    "adamw": ["--optim.name", "adamw", "--optim.hparams", ADAM_HPARAMS],
    "radam": ["--optim.name", "radam", "--optim.hparams", ADAM_HPARAMS],
}
RAMP = [[0, 16], [400_000, 32], [650_000, 64]]
CASES = {
    "a_ref16": ["--batch.global_batch", "16"],
    "b_const64": ["--batch.global_batch", "64"],
    "c_ramp": ["--batch.schedule", json.dumps(RAMP)],
    "d_auto": ["--batch.schedule", "auto", "--batch.min_global_batch", "16", "--batch.max_global_batch", "64"],
}


def summarize(records: list[dict], seconds: float) -> dict:
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    changes = [r for r in records if r["kind"] == "batch_change"]
    return {"final_eval_loss": evals[-1]["eval_loss"], "steps": train[-1]["step"], "tokens": train[-1]["tokens"],
            "seconds": seconds, "batches": [train[0]["global_batch"]] + [c["global_batch"] for c in changes],
            "changes_at_tokens": [c["tokens"] for c in changes],
            "noise_scale": [(r["tokens"], r["noise_scale"]) for r in train if r.get("noise_scale")],
            "evals": [(r["tokens"], r["eval_loss"]) for r in evals],
            "global_batch": [(r["tokens"], r["global_batch"]) for r in train]}


def plot(results: dict, tokens: int, path: Path) -> None:
    plt = pyplot()
    opts = sorted({k.split("/")[0] for k in results})
    fig, axes = plt.subplots(2, len(opts), figsize=(6 * len(opts), 7), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": [2, 1]})
    for col, opt in enumerate(opts):
        ax, axb = axes[0][col], axes[1][col]
        for case in CASES:
            r = results.get(f"{opt}/{case}")
            if r is None:
                continue
            x, y = zip(*r["evals"])
            ax.plot(x, y, "o-", ms=3, label=f"{case}: {r['final_eval_loss']:.4f}, {r['steps']} steps")
            bx, by = zip(*r["global_batch"])
            axb.step(bx, by, where="pre", label=case)
        ref = results.get(f"{opt}/a_ref16")
        if ref and ref["noise_scale"]:
            nx, ny = zip(*ref["noise_scale"])
            axb.plot(nx, ny, ".", ms=2, color="k", label="B_noise of a_ref16")
        ax.set_title(f"{opt}, {tokens:,} tokens")
        ax.set_ylabel("eval loss (nats/token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        axb.set_yscale("log", base=2)
        axb.set_ylabel("sequences")
        axb.set_xlabel("tokens")
        axb.legend(fontsize=7)
        axb.grid(alpha=0.3)
    save_png(fig, str(path))


def noise_cost(args) -> None:
    rates: dict[str, list[float]] = {"with": [], "without": []}
    base = ["--batch.global_batch", "16", "--train.max_steps", str(args.cost_steps), "--train.eval_every", "0",
            "--checkpoint.at_end", "false", "--logging.plot", "false"]
    for rep in range(args.repeats):
        for name, extra in (("with", []), ("without", ["--train.noise_scale_every", "0"])):
            records, _ = run_train(args.out / f"cost_{name}", base + extra, args.nproc, args.threads)
            train = [r for r in records if r["kind"] == "train"][2:]  # leave out the first windows (compilation)
            rates[name].append(statistics.median(r["tokens_per_s"] for r in train))
            print(f"repeat {rep}: {name:<7} noise scale: {rates[name][-1]:,.0f} tokens/s", flush=True)
    w, wo = statistics.median(rates["with"]), statistics.median(rates["without"])
    print(f"noise scale every step: {w:,.0f} tokens/s, off: {wo:,.0f} tokens/s, ratio {w / wo:.3f} "
          f"({args.nproc} processes, global batch 16, median of {args.repeats} alternated runs)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[800_000, 3_000_000])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / nproc)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "batch_schedule")
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "wsd"],
                   help="the learning-rate schedule of every run (schedule.kind)")
    p.add_argument("--tag", default="", help="a name for this set of runs in results.json (e.g. the overrides)")
    p.add_argument("overrides", nargs="*", help="train.py overrides for every run, after --")
    p.add_argument("--noise-cost", action="store_true", help="measure the cost of the noise scale instead")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cost-steps", type=int, default=150)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.noise_cost:
        noise_cost(args)
        return
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for tokens in args.tokens:
        base = f"{tokens}/{args.nproc}p/{args.lr_schedule}"
        label = f"{base}/{args.tag}" if args.tag else base
        key_of = lambda opt, case: f"{label}/{opt}/{case}"  # noqa: E731
        for opt in args.optimizers:
            for case in args.cases:
                r = summarize(*run_train(args.out / f"{opt}_{case}_{label.replace('/', '_')}",
                                         OPTIMIZERS[opt] + CASES[case] + ["--train.tokens", str(tokens),
                                                                          "--train.eval_every", "50",
                                                                          "--schedule.kind", args.lr_schedule,
                                                                          *args.overrides],
                                         args.nproc, args.threads))
                # merged into the file as it is now: another set of runs may be writing it too
                results = json.loads(results_path.read_text()) if results_path.exists() else {}
                results[key_of(opt, case)] = r
                write_text(results_path, json.dumps(results, indent=1))
                print(f"{tokens:>9,} {opt:<9} {case:<10} eval {r['final_eval_loss']:.4f} steps {r['steps']:>5} "
                      f"batches {r['batches']} at {r['changes_at_tokens']} ({r['seconds']:.0f} s)", flush=True)
        print(f"\n{tokens:,} tokens, {args.nproc} processes, {args.lr_schedule} lr schedule "
              f"{' '.join(args.overrides)}")
        print(f"{'optimizer':<9} {'case':<10} {'eval loss':>9} {'vs (a)':>8} {'steps':>6} {'fewer steps':>11}  batches")
        for opt in args.optimizers:
            # a tagged set (other overrides) compares with its own reference, else the untagged one's
            ref = results.get(key_of(opt, "a_ref16")) or results.get(f"{base}/{opt}/a_ref16")
            for case in args.cases:
                r = results[key_of(opt, case)]
                gap = f"{100 * (r['final_eval_loss'] / ref['final_eval_loss'] - 1):+.2f}%" if ref else "-"
                fewer = f"{100 * (1 - r['steps'] / ref['steps']):.0f}%" if ref else "-"
                print(f"{opt:<9} {case:<10} {r['final_eval_loss']:9.4f} {gap:>8} {r['steps']:6d} {fewer:>11}  "
                      f"{r['batches']} at {r['changes_at_tokens']}")
            if ref and ref["noise_scale"]:
                marks = [t for t in (100_000, 250_000, 400_000, 550_000, 650_000, 750_000, 1_500_000, 2_500_000)
                         if t <= tokens]
                ns = {t: min(ref["noise_scale"], key=lambda x: abs(x[0] - t))[1] for t in marks}
                print(f"  B_noise of (a), {opt}: " + ", ".join(f"{v:.0f} at {t // 1000}k" for t, v in ns.items()))
        png = args.out / f"batch_schedule_{label.replace('/', '_')}.png"
        plot({k[len(label) + 1:]: v for k, v in results.items() if k.startswith(f"{label}/")}, tokens, png)
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
