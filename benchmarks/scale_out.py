"""Cost model of scale-out: node-hours and wall time of (a) a fixed small allocation, (b) a fixed large
one and (c) a run that moves to more nodes as its batch schedule grows (``scale_out`` policy), for
the tiny config measured here and the 125m / 1.3b configs on paper.

The model (the automatic schedule's batch, the extra tokens of a batch above it, the three strategies) is
:mod:`bigbatch.scaling.cost`, which ``bigbatch plan`` prices a config's run with.

Tiny (measured): ``train.py`` of configs/tiny.yaml as 1 and 2 single-thread processes ("nodes" of
one CPU core each), alternated ``--repeats`` times, tokens/s of each (median) and the start-up time
(the restart cost); its B_noise curve from a train.py run with ``train.noise_scale_every`` (or
``--noise-from`` an existing metrics.jsonl). 125m / 1.3b (on paper): see ``PAPER`` for every
assumption (GPU throughput, interconnect, restart cost, the critical batch along training).

    python benchmarks/scale_out.py [--noise-from runs/x/metrics.jsonl] [--noise-tokens 600000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tiny_runs import read_records, run_train  # noqa: E402
from bigbatch.atomic import write_text  # noqa: E402
from bigbatch.scaling import cost  # noqa: E402
from bigbatch.scaling.cost import Cluster, assumptions, costs, critical_batch_curve  # noqa: E402


# ---------------------------------------------------------------- the 125m / 1.3b configs on paper

H100_BF16_FLOPS = 989e12  # dense
SEQ = 2048
PAPER = {
    # params, budget (20 tokens/param), micro batch per GPU (sequences), max_nodes
    "125m": (125e6, 2.5e9, 8, 8),
    "1.3b": (1.3e9, 26e9, 4, 32),
}
PAPER_ASSUMPTIONS = (
    "8 x H100 per node at " + assumptions(restart_s=600.0) + " (and 2 min: the rows marked so); max_grad_accum 1; "
    "smallest micro batch 8 (125m) / 4 (1.3b) sequences of 2048 tokens")


def paper_cluster(name: str, restart_s: float = 600.0) -> tuple[Cluster, callable]:
    params, budget, micro, max_nodes = PAPER[name]
    c = cost.paper_cluster(name, params=params, tokens=budget, micro_batch=micro, seq_len=SEQ, gpus_per_node=8,
                           small=1, max_nodes=max_nodes, gpu_flops=H100_BF16_FLOPS, restart_s=restart_s)
    return c, critical_batch_curve(params)


# ---------------------------------------------------------------- the tiny config, measured


def noise_curve(records: list[dict], seq_len: int):
    """B_noise(tokens) in tokens from a run's train records: linear between measurements, a power law
    fitted to them beyond the last (and the first value before the first)."""
    pts = [(r["tokens"], r["noise_scale"] * seq_len) for r in records
           if r.get("kind") == "train" and r.get("noise_scale")]
    if len(pts) < 3:
        raise SystemExit("the B_noise run has fewer than 3 noise_scale measurements")
    tail = pts[len(pts) // 2:]
    xs, ys = [math.log(t) for t, _ in tail], [math.log(b) for _, b in tail]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)

    def b_noise(tokens: float) -> float:
        if tokens <= pts[0][0]:
            return pts[0][1]
        if tokens >= pts[-1][0]:
            return pts[-1][1] * (tokens / pts[-1][0]) ** max(slope, 0.0)
        for (t0, b0), (t1, b1) in zip(pts, pts[1:]):
            if t0 <= tokens <= t1:
                return b0 + (b1 - b0) * (tokens - t0) / max(t1 - t0, 1)
        return pts[-1][1]

    return b_noise, pts, slope


def measure_tiny(out: Path, steps: int, repeats: int, batch: int) -> dict:
    """tokens/s (median over the steady steps of every repeat) and start-up seconds of 1 and 2
    single-thread processes, alternated."""
    tps = {1: [], 2: []}
    startup = {1: [], 2: []}
    for _ in range(repeats):
        for n in (1, 2):
            recs, wall = run_train(out / f"tp{n}", ["--batch.global_batch", str(batch), "--train.max_steps",
                                                    str(steps), "--train.eval_every", "0", "--train.log_every", "1",
                                                    "--checkpoint.at_end", "false", "--logging.plot", "false"],
                                   n, threads=1)
            train = [r for r in recs if r["kind"] == "train"][3:]  # the first steps warm up
            rate = statistics.median(r["tokens_per_s"] for r in train)
            tps[n].append(rate)
            total = [r for r in recs if r["kind"] == "train"][-1]["tokens"]
            startup[n].append(wall - total / rate)
    return {"tokens_per_s": {n: statistics.median(v) for n, v in tps.items()},
            "startup_s": {n: statistics.median(v) for n, v in startup.items()},
            "all_tokens_per_s": tps}


def table(rows: list[tuple[str, dict]]) -> str:
    head = ("| config | strategy | nodes | wall h | node-h | tokens (x schedule run) | moves |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    names = {"a": "(a) fixed small", "b": "(b) fixed large", "c": "(c) scale-out"}
    for label, (c, res) in rows:
        base = res["c"]["tokens"]
        for k in ("a", "b", "c"):
            r = res[k]
            nodes = {"a": str(c.small), "b": str(c.max_nodes), "c": f"{c.small}->{c.max_nodes}"}[k]
            lines.append(f"| {label} | {names[k]} | {nodes} | {r['wall_s'] / 3600:.4g} | {r['node_s'] / 3600:.4g} | "
                         f"{r['tokens'] / base:.3f} | {r['moves'] if k == 'c' else '-'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_scale_out")
    p.add_argument("--noise-from", help="metrics.jsonl of a tiny run with noise_scale (default: run one)")
    p.add_argument("--noise-tokens", type=int, default=600_000, help="tokens of the B_noise run")
    p.add_argument("--tokens", type=float, default=3e6, help="the tiny run's budget the model prices")
    p.add_argument("--steps", type=int, default=30, help="steps of each throughput run")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out)
    seq_len, micro = 128, 16  # configs/tiny.yaml: data.seq_len, the largest micro batch

    if args.noise_from:
        noise_records = read_records(Path(args.noise_from))
    else:
        noise_records, _ = run_train(out / "noise", ["--train.tokens", str(args.noise_tokens),
                                                     "--train.noise_scale_every", "4", "--train.eval_every", "0",
                                                     "--train.log_every", "4", "--logging.plot", "false"], 2)
    b_noise, pts, slope = noise_curve(noise_records, seq_len)
    meas = measure_tiny(out, args.steps, args.repeats, micro)
    tps = meas["tokens_per_s"]
    tiny = Cluster("tiny", min_batch_node=micro * seq_len, max_grad_accum=1, small=1, max_nodes=2,
                   restart_s=meas["startup_s"][2], tokens=args.tokens, tokens_per_s=tps)
    print(f"tiny, measured: {tps[1]:,.0f} tokens/s on 1 process, {tps[2]:,.0f} on 2 (ratio {tps[2] / tps[1]:.2f}; "
          f"every repeat: {meas['all_tokens_per_s']}); start-up {meas['startup_s'][1]:.1f} s / "
          f"{meas['startup_s'][2]:.1f} s")
    print(f"tiny B_noise: {pts[0][1] / seq_len:.1f} sequences at {pts[0][0]:,} tokens, {pts[-1][1] / seq_len:.1f} at "
          f"{pts[-1][0]:,}; beyond, x tokens^{max(slope, 0):.2f} (B_noise at {args.tokens:,.0f}: "
          f"{b_noise(args.tokens) / seq_len:.0f} sequences)")
    rows = [(f"tiny ({args.tokens / 1e6:g}M tokens, measured)", (tiny, costs(tiny, b_noise)))]
    for name in PAPER:
        for restart_min in (10, 2):
            c, bn = paper_cluster(name, restart_min * 60.0)
            rows.append((f"{name} ({c.tokens / 1e9:g}B tokens, paper, restart {restart_min} min)", (c, costs(c, bn))))
    text = table(rows)
    print(text)
    print(f"paper assumptions: {PAPER_ASSUMPTIONS}")
    print("tiny: a node = one single-thread process; micro batch 16 x 128 tokens, max_grad_accum 1, schedule "
          f"16 -> 64 sequences; restart cost = the measured 2-process start-up ({tiny.restart_s:.1f} s)")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps({
        "tiny_measured": meas, "noise_points": pts, "table": text, "paper_assumptions": PAPER_ASSUMPTIONS,
        "rows": {label: {k: v for k, v in res.items()} for label, (_, res) in rows}}, indent=1, default=str))


if __name__ == "__main__":
    main()
