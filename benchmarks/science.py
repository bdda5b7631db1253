"""The science report: the claims of the three papers bigbatch is built on, measured on the tiny
Transformer that train.py trains (and one small classification task), written to ``docs/science.md``.

    python benchmarks/science.py                       # every section, about 30 min on 2 cores
    python benchmarks/science.py --sections adabound   # one section; the others keep their results
    python benchmarks/science.py --render              # rewrite the report from OUT/results.json

Sections (every number comes from train.py or ``bigbatch check-rules`` runs in this invocation, or
from an earlier one kept in ``OUT/results.json``):

* ``sde`` -- Malladi et al. 2022: branches from a warm checkpoint at kappa = 1, 2, 4, 8 with the
  square-root rule (Adam, RAdam) and the derived AdaBound rule, kappa > 1 without the rule (Adam),
  SVAG l = 2, 4; and the same check early in training next to the noise scale measured there
  (McCandlish et al. 2018: the rules hold below the critical batch).
* ``adabound`` -- Luo et al. 2019 on the Transformer: final_lr x gamma (and lr) sweep, the share of
  coordinates clipped by each bound over training, the chosen setting against AdamW at the README's
  run length.
* ``generalisation`` -- the paper's comparison (AdaBound / AMSBound against Adam and SGD with
  momentum, train against held-out accuracy) on a small teacher-student classification task.
* ``radam`` -- Liu et al. 2020: RAdam without warmup against Adam with and without warmup over
  learning rates.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tiny_runs import launch, run_train  # noqa: E402
from bigbatch.atomic import write_text  # noqa: E402
from bigbatch.training.metrics import pyplot, save_png  # noqa: E402
from bigbatch.training.config import BatchConfig  # noqa: E402

SECTIONS = ("adabound", "generalisation", "radam", "sde")
NPROC = 2
SEQ = 128  # configs/tiny.yaml
B0 = 16  # its reference global batch: 2,048 tokens per step

# adabound: the sweep's budget, its grid, and the confirmation at the README's run length
SWEEP_TOKENS = 400_000
SWEEP = [(0.1, 1e-3), (1.0, 1e-3), (10.0, 1e-3), (0.1, 1e-4), (1.0, 1e-4), (10.0, 1e-4)]  # (final_lr, gamma)
ADAMW = "{lr: 3.0e-3, betas: [0.9, 0.99], eps: 1.0e-8, weight_decay: 0.0}"
# radam
RADAM_TOKENS = 250_000
RADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
RADAM_BETAS = "[0.9, 0.999]"  # the paper's; the variance of the adaptive lr is largest early with beta2 near 1
ADAM_WARMUP_TOKENS = 100_000  # about 49 steps of 146
# sde
SRC_STEPS = 146  # the warm checkpoint: about 300k tokens
EARLY_STEPS = 24  # the early one: about 50k tokens
BRANCH_TOKENS = 131_072  # 8 steps at kappa 8
SDE_OPTIMIZERS = {"adam": ["--optim.name", "adam", "--optim.hparams", ADAMW],
                  "radam": ["--optim.name", "radam", "--optim.hparams", ADAMW],
                  "adabound": []}  # configs/tiny.yaml's


def log(msg: str) -> None:
    print(f"[science {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def final_eval(records: list[dict]) -> float:
    return [r for r in records if r["kind"] == "eval"][-1]["eval_loss"]


# ------------------------------------------------------------------ adabound


def adabound_args(final_lr: float, gamma: float, lr: float = 3e-3, name: str = "adabound") -> list[str]:
    return ["--optim.name", name, "--optim.hparams",
            f"{{lr: {lr}, betas: [0.9, 0.99], final_lr: {final_lr}, gamma: {gamma}, eps: 1.0e-8, weight_decay: 0.0}}"]


def section_adabound(out: Path) -> dict:
    runs, res = out / "runs", {"sweep": [], "tokens": SWEEP_TOKENS}
    budget = ["--train.tokens", str(SWEEP_TOKENS), "--train.eval_every", "50", "--checkpoint.at_end", "false",
              "--logging.plot", "false"]
    for final_lr, gamma in SWEEP:
        recs, sec = run_train(runs / f"ab_f{final_lr:g}_g{gamma:g}", adabound_args(final_lr, gamma) + budget, NPROC)
        res["sweep"].append(_ab_row("adabound", 3e-3, final_lr, gamma, recs, sec))
        log(f"adabound final_lr {final_lr:g} gamma {gamma:g}: {res['sweep'][-1]['eval_loss']:.4f}")
    best = min(res["sweep"], key=lambda r: r["eval_loss"])
    for lr in (1e-3, 1e-2):  # the lr around the best bounds
        recs, sec = run_train(runs / f"ab_best_lr{lr:g}", adabound_args(best["final_lr"], best["gamma"], lr) + budget,
                              NPROC)
        res["sweep"].append(_ab_row("adabound", lr, best["final_lr"], best["gamma"], recs, sec))
        log(f"adabound lr {lr:g} at the best bounds: {res['sweep'][-1]['eval_loss']:.4f}")
    best = min(res["sweep"], key=lambda r: r["eval_loss"])
    recs, sec = run_train(runs / "ams_best", adabound_args(best["final_lr"], best["gamma"], best["lr"], "amsbound")
                          + budget, NPROC)
    res["amsbound_best"] = _ab_row("amsbound", best["lr"], best["final_lr"], best["gamma"], recs, sec)
    recs, sec = run_train(runs / "adamw_sweep", ["--optim.name", "adamw", "--optim.hparams", ADAMW] + budget, NPROC)
    res["adamw"] = {"eval_loss": final_eval(recs), "seconds": sec}
    res["best"] = best
    # the README's run (configs/tiny.yaml's budget): the shipped bounds, the best ones, AdamW
    res["full"] = {}
    for name, args in (("shipped", adabound_args(0.1, 1e-3)),
                       ("best", adabound_args(best["final_lr"], best["gamma"], best["lr"])),
                       ("adamw", ["--optim.name", "adamw", "--optim.hparams", ADAMW])):
        recs, sec = run_train(runs / f"full_{name}", args + ["--checkpoint.at_end", "false"], NPROC)
        ev = [r for r in recs if r["kind"] == "eval"]
        res["full"][name] = {"eval_loss": ev[-1]["eval_loss"], "ppl": ev[-1]["eval_ppl"], "tokens": ev[-1]["tokens"],
                             "steps": ev[-1]["step"], "seconds": sec, "evals": [(r["tokens"], r["eval_loss"]) for r in ev],
                             "clipped": _clipped(recs)}
        log(f"full run {name}: {res['full'][name]['eval_loss']:.4f}")
    _plot_adabound(res, out)
    return res


def _clipped(recs: list[dict]) -> list[tuple[int, float, float]]:
    return [(r["tokens"], r["clipped_lower"], r["clipped_upper"]) for r in recs
            if r["kind"] == "train" and "clipped_lower" in r]


def _ab_row(name, lr, final_lr, gamma, recs, sec) -> dict:
    return {"optimizer": name, "lr": lr, "final_lr": final_lr, "gamma": gamma, "eval_loss": final_eval(recs),
            "seconds": sec, "clipped": _clipped(recs)}


def _plot_adabound(res: dict, out: Path) -> None:
    plt = pyplot()
    fig, (ax, axc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in res["full"].items():
        x, y = zip(*r["evals"])
        ax.plot(x, y, "o-", ms=3, label=f"{name}: {r['eval_loss']:.4f}")
        if r["clipped"]:
            t, lo, hi = zip(*r["clipped"])
            axc.plot(t, hi, "-", label=f"{name}: above the upper bound")
            axc.plot(t, lo, "--", label=f"{name}: below the lower bound")
    for r in res["sweep"][:len(SWEEP)]:
        if r["clipped"]:
            t, lo, hi = zip(*r["clipped"])
            axc.plot(t, [a + b for a, b in zip(lo, hi)], ":", lw=1, label=f"sweep f{r['final_lr']:g} g{r['gamma']:g}: clipped")
    ax.set_xlabel("tokens")
    ax.set_ylabel("eval loss")
    ax.set_title("configs/tiny.yaml budget")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    axc.set_xlabel("tokens")
    axc.set_ylabel("share of coordinates")
    axc.set_title("AdaBound: step sizes clipped by the bounds")
    axc.legend(fontsize=6)
    axc.grid(alpha=0.3)
    save_png(fig, str(out / "adabound.png"))


# ------------------------------------------------------------------ generalisation


GEN_TASK = ("A random 2-layer teacher (32 -> 64 tanh -> 10) labels Gaussian inputs; 15% of the training labels "
            "are flipped; a student MLP (32 -> 256 -> 256 -> 10, ReLU) trains on 2,000 samples and is tested on "
            "20,000. Settings of Luo et al. for CIFAR-10: SGDM lr 0.1 momentum 0.9; Adam, AdaBound and AMSBound "
            "lr 1e-3, AdaBound/AMSBound final_lr 0.1 gamma 1e-3; weight decay 5e-4; lr x 0.1 after 75% of the "
            "epochs; 3 seeds.")


def section_generalisation(out: Path) -> dict:
    """Teacher-student classification (``GEN_TASK``): train against held-out accuracy."""
    import torch

    from bigbatch.optim import AdaBound, AMSBound

    torch.set_num_threads(2)
    opts = {"SGDM": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
            "Adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4),
            "AdaBound": lambda p: AdaBound(p, lr=1e-3, final_lr=0.1, gamma=1e-3, weight_decay=5e-4),
            "AMSBound": lambda p: AMSBound(p, lr=1e-3, final_lr=0.1, gamma=1e-3, weight_decay=5e-4)}
    epochs, batch, seeds = 60, 64, (0, 1, 2)
    rows: dict[str, list[dict]] = {k: [] for k in opts}
    for seed in seeds:
        g = torch.Generator().manual_seed(100 + seed)
        w1, w2 = torch.randn(32, 64, generator=g), torch.randn(64, 10, generator=g)
        x = torch.randn(22_000, 32, generator=g)
        y = (torch.tanh(x @ w1) @ w2).argmax(1)
        xtr, ytr, xte, yte = x[:2000], y[:2000].clone(), x[2000:], y[2000:]
        flip = torch.rand(2000, generator=g) < 0.15
        ytr[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
        for name, make in opts.items():
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                        torch.nn.ReLU(), torch.nn.Linear(256, 10))
            opt = make(model.parameters())
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.75 * epochs)], 0.1)
            curve = []
            for ep in range(epochs):
                perm = torch.randperm(2000, generator=torch.Generator().manual_seed(seed * 1000 + ep))
                for i in range(0, 2000, batch):
                    idx = perm[i:i + batch]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
                    opt.step()
                sched.step()
                if ep % 5 == 4:
                    curve.append((ep + 1, _accuracy(model, xte, yte)[0]))
            tr_acc, tr_loss = _accuracy(model, xtr, ytr)
            te_acc, te_loss = _accuracy(model, xte, yte)
            rows[name].append({"seed": seed, "train_acc": tr_acc, "train_loss": tr_loss, "test_acc": te_acc,
                               "test_loss": te_loss, "curve": curve})
        log(f"generalisation seed {seed}: " + ", ".join(f"{k} {v[-1]['test_acc']:.3f}" for k, v in rows.items()))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in rows.items():
        ep = [c[0] for c in rs[0]["curve"]]
        ax.plot(ep, [sum(r["curve"][i][1] for r in rs) / len(rs) for i in range(len(ep))], "o-", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy (mean of 3 seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, str(out / "generalisation.png"))
    return {"epochs": epochs, "batch": batch, "rows": rows}


def _accuracy(model, x, y) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        logits = model(x)
        return float((logits.argmax(1) == y).float().mean()), float(torch.nn.functional.cross_entropy(logits, y))


# ------------------------------------------------------------------ radam


def section_radam(out: Path) -> dict:
    runs, rows = out / "runs", []
    variants = {"Adam, no warmup": ("adam", 0), f"Adam, warmup {ADAM_WARMUP_TOKENS // 1000}k tokens": ("adam", ADAM_WARMUP_TOKENS),
                "RAdam, no warmup": ("radam", 0)}
    for lr in RADAM_LRS:
        for label, (name, warmup) in variants.items():
            args = ["--optim.name", name, "--optim.hparams", f"{{lr: {lr}, betas: {RADAM_BETAS}, eps: 1.0e-8}}",
                    "--schedule.warmup_tokens", str(warmup), "--train.tokens", str(RADAM_TOKENS),
                    "--train.eval_every", "25", "--checkpoint.at_end", "false", "--logging.plot", "false"]
            recs, sec = run_train(runs / f"radam_{name}_w{warmup}_lr{lr:g}", args, NPROC)
            rows.append({"variant": label, "lr": lr, "eval_loss": final_eval(recs), "seconds": sec,
                         "evals": [(r["tokens"], r["eval_loss"]) for r in recs if r["kind"] == "eval"]})
            log(f"{label} lr {lr:g}: {rows[-1]['eval_loss']:.4f}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in variants:
        pts = [(r["lr"], r["eval_loss"]) for r in rows if r["variant"] == label]
        ax.plot(*zip(*pts), "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("peak lr")
    ax.set_ylabel(f"eval loss after {RADAM_TOKENS:,} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, str(out / "radam.png"))
    return {"tokens": RADAM_TOKENS, "betas": RADAM_BETAS, "rows": rows}


# ------------------------------------------------------------------ sde (and the noise scale)


def check_rules(src: Path, out: Path, extra: list[str]) -> dict:
    launch(["check-rules", "--from", str(src), "--tokens", str(BRANCH_TOKENS), "--evals", "4", "--out", str(out),
            "--logging.progress", "none", *extra], NPROC, module="bigbatch.cli")
    return json.loads((out / "report.json").read_text())


def section_sde(out: Path) -> dict:
    runs, res = out / "runs", {}
    for opt, args in SDE_OPTIMIZERS.items():
        src = runs / f"src_{opt}"
        base = args + ["--checkpoint.keep", "1", "--logging.plot", "false"]
        if opt == "adam":  # the early point first, then the same run continued to the warm one
            run_train(src, base + ["--train.max_steps", str(EARLY_STEPS)], NPROC)
            early = runs / "src_adam_early"
            shutil.rmtree(early, ignore_errors=True)
            shutil.copytree(src, early)
            launch(["--resume", str(src), "--train.max_steps", str(SRC_STEPS), "--logging.progress", "none"], NPROC)
            res["adam_early"] = check_rules(early, out / "check_adam_early", ["--kappas", "1,2,4,8"])
            log(f"adam early: critical batch {res['adam_early']['summary']['critical_batch']}")
        else:
            run_train(src, base + ["--train.max_steps", str(SRC_STEPS)], NPROC)
        extra = ["--kappas", "1,2,4,8", "--svag", "2,4"] + (["--without-rules"] if opt == "adam" else [])
        res[opt] = check_rules(src, out / f"check_{opt}", extra)
        if opt == "adabound":  # the form of final_lr's rule these branches ran with (the config's default)
            res[opt]["bound_form"] = BatchConfig().bound_form
        log(f"{opt}: critical batch {res[opt]['summary']['critical_batch']}, SDE holds {res[opt]['summary']['sde_holds']}")
    return res


# ------------------------------------------------------------------ report


def _branch_table(report: dict) -> list[str]:
    lines = ["| branch | global batch | rule | steps | final eval loss | gap to k1 | largest gap on the way | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for b in report["branches"]:
        rule = f"SVAG l={b['l']:g}" if b["l"] != 1 else ("yes" if b["rules"] else "no")
        lines.append(f"| {b['name']} | {b['global_batch']} | {rule} | {b['steps']} | {b['final_loss']:.4f} | "
                     f"{b['gap']:+.2%} | {b['max_gap']:.2%} | {b['verdict'] or '-'} |")
    return lines


def _noise(report: dict) -> str:
    v = report["start"]["noise_scale"]
    return f"{v:.1f}" if v is not None else "not measured"


def render(res: dict, out: Path, md: Path) -> str:
    rel = Path(out.resolve().relative_to(md.parent.resolve())) if out.resolve().is_relative_to(md.parent.resolve()) else out
    L = ["# bigbatch: the science report", "",
         "Regenerated by `python benchmarks/science.py` (every number below comes from train.py or "
         "`bigbatch check-rules` runs of that invocation, on the machine named at the end). Model: "
         "`configs/tiny.yaml` (0.69M-parameter Llama, 2 layers, width 128, 2,048-token BPE, sequences of 128 "
         f"tokens, reference batch {B0}), {NPROC} CPU processes, DeepSpeed ZeRO-1, fp32.", ""]
    sde = res.get("sde")
    if sde:
        a = sde["adam"]
        s = a["summary"]
        by = {b["name"]: b for b in a["branches"]}
        L += ["## 1. Scaling rules and the SDE (Malladi et al. 2022)", "",
              f"**Run.** A warm checkpoint after {SRC_STEPS} steps ({a['start']['tokens']:,} tokens) of each optimizer, "
              f"then `bigbatch check-rules --kappas 1,2,4,8 --svag 2,4 --tokens {BRANCH_TOKENS}` from it: every branch "
              f"reads the same {BRANCH_TOKENS:,} tokens (SVAG: l times as many, compared at tokens / l), evaluated on "
              "the same held-out blocks. `k1_seed2` is kappa 1 with another data order (the seed-to-seed noise); "
              "for Adam, `k<kappa>_norule` keeps the starting hyperparameters at the larger batch.", "",
              "### Adam (square-root rule)", "", *_branch_table(a), "",
              f"Tolerance {s['tolerance']:.2%}; measured critical batch **{s['critical_batch']}**; SVAG: the SDE "
              f"approximation {'holds' if s['sde_holds'] else 'does not hold'}. B_noise at the checkpoint: {_noise(a)}.",
              "", f"![Adam branches]({rel}/check_adam/eval_loss.png)", ""]
        # reports from before bound_form existed ran final_lr x kappa
        bound = {"sqrt": "final_lr x sqrt(kappa)",
                 "linear": "final_lr x kappa"}[sde["adabound"].get("bound_form", "linear")]
        for opt, title in (("radam", "RAdam (square-root rule)"), ("adabound", f"AdaBound (derived rule, {bound})")):
            r = sde[opt]
            L += [f"### {title}", "", *_branch_table(r), "",
                  f"Tolerance {r['summary']['tolerance']:.2%}; measured critical batch **{r['summary']['critical_batch']}**;"
                  f" SVAG: {'holds' if r['summary']['sde_holds'] else 'does not hold'}. B_noise at the checkpoint: "
                  f"{_noise(r)}.", "", f"![{opt} branches]({rel}/check_{opt}/eval_loss.png)", ""]
        L += ["**Verdict.** " + _sde_verdict(sde, by), ""]
        e = sde["adam_early"]
        L += ["", "### The noise scale predicts where the rules break (McCandlish et al. 2018)", "",
              "| point of training | tokens | B_noise there | measured critical batch (check-rules, Adam) |",
              "|---|---|---|---|",
              f"| early | {e['start']['tokens']:,} | {_noise(e)} | {e['summary']['critical_batch']} |",
              f"| warm | {a['start']['tokens']:,} | {_noise(a)} | {s['critical_batch']} |", "",
              *_branch_table(e), "", f"![Adam branches early]({rel}/check_adam_early/eval_loss.png)", "",
              "**Verdict.** " + _noise_verdict(e, a), ""]
    ab = res.get("adabound")
    if ab:
        full = ab["full"]
        best = ab["best"]
        L += ["## 2. AdaBound on the Transformer (Luo et al. 2019)", "",
              f"**Sweep** ({ab['tokens']:,} tokens each; lr 3e-3, betas (0.9, 0.99) unless stated; AdamW with the "
              f"same lr and betas: **{ab['adamw']['eval_loss']:.4f}**):", "",
              "| optimizer | lr | final_lr | gamma | eval loss | clipped at the end (below / above) |", "|---|---|---|---|---|---|"]
        for r in ab["sweep"] + [ab["amsbound_best"]]:
            c = r["clipped"][-1] if r["clipped"] else (None, math.nan, math.nan)
            L.append(f"| {r['optimizer']} | {r['lr']:g} | {r['final_lr']:g} | {r['gamma']:g} | {r['eval_loss']:.4f} | "
                     f"{c[1]:.1%} / {c[2]:.1%} |")
        L += ["", f"**At the README's run length** ({full['best']['tokens']:,} tokens, `configs/tiny.yaml`):", "",
              "| run | eval loss | perplexity |", "|---|---|---|",
              f"| AdaBound as shipped before (final_lr 0.1, gamma 1e-3) | {full['shipped']['eval_loss']:.4f} | {full['shipped']['ppl']:.2f} |",
              f"| AdaBound, chosen (lr {best['lr']:g}, final_lr {best['final_lr']:g}, gamma {best['gamma']:g}) | "
              f"{full['best']['eval_loss']:.4f} | {full['best']['ppl']:.2f} |",
              f"| AdamW (lr 3e-3, betas (0.9, 0.99)) | {full['adamw']['eval_loss']:.4f} | {full['adamw']['ppl']:.2f} |", "",
              f"![AdaBound]({rel}/adabound.png)", "", "**What the bounds do here.** " + _bounds_text(ab), ""]
    gen = res.get("generalisation")
    if gen:
        L += ["## 2b. Generalisation: the paper's comparison on a small task", "",
              f"{GEN_TASK} {gen['epochs']} epochs, batch {gen['batch']}.", "",
              "| optimizer | train accuracy | held-out accuracy | train loss | held-out loss |", "|---|---|---|---|---|"]
        for name, rs in gen["rows"].items():
            m = {k: sum(r[k] for r in rs) / len(rs) for k in ("train_acc", "test_acc", "train_loss", "test_loss")}
            sd = (sum((r["test_acc"] - m["test_acc"]) ** 2 for r in rs) / max(1, len(rs) - 1)) ** 0.5
            L.append(f"| {name} | {m['train_acc']:.3f} | {m['test_acc']:.3f} ± {sd:.3f} | {m['train_loss']:.3f} | "
                     f"{m['test_loss']:.3f} |")
        L += ["", f"![generalisation]({rel}/generalisation.png)", "", "**Verdict.** " + _gen_verdict(gen), ""]
    ra = res.get("radam")
    if ra:
        L += ["## 3. RAdam: robustness to the learning rate without warmup (Liu et al. 2020)", "",
              f"{ra['tokens']:,} tokens per run, betas {ra['betas']}, cosine decay; eval loss at the end:", "",
              "| peak lr | " + " | ".join(sorted({r['variant'] for r in ra['rows']}, key=lambda v: v)) + " |",
              "|---|" + "---|" * len({r['variant'] for r in ra['rows']})]
        variants = sorted({r["variant"] for r in ra["rows"]})
        for lr in sorted({r["lr"] for r in ra["rows"]}):
            cells = [next(f"{r['eval_loss']:.4f}" for r in ra["rows"] if r["lr"] == lr and r["variant"] == v)
                     for v in variants]
            L.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        L += ["", f"![RAdam]({rel}/radam.png)", "", "**Verdict.** " + _radam_verdict(ra), ""]
    growth = out / "batch_growth.md"  # section 4, measured by benchmarks/beta_rule.py and batch_schedule.py
    if growth.exists():
        L += [growth.read_text().rstrip(), ""]
    L += ["---", f"Machine: {res.get('machine', '?')}. Wall time of the sections: " +
          ", ".join(f"{k} {v / 60:.1f} min" for k, v in res.get("seconds", {}).items()) + "."]
    return "\n".join(L) + "\n"


def _sde_verdict(sde: dict, by: dict) -> str:
    s = sde["adam"]["summary"]
    tol = s["tolerance"]
    rows = [(k, by[f"k{k}"]["gap"], by[f"k{k}_norule"]["gap"]) for k in (2, 4, 8)]
    holds = [k for k, g, _ in rows if g <= tol]
    closer = [k for k, g, n in rows if abs(g) < abs(n)]
    worse = [k for k, g, n in rows if abs(g) > abs(n)]
    svag = {name: sde[name]["summary"]["sde_holds"] for name in ("adam", "radam", "adabound")}
    text = ("Adam with the square-root rule, gap to kappa 1 against the same batch without the rule: "
            + ", ".join(f"kappa {k}: {g:+.2%} vs {n:+.2%}" for k, g, n in rows) + f" (tolerance {tol:.2%}). ")
    text += (f"The rule holds up to kappa {max(holds) if holds else 1} (batch {s['critical_batch']}) and brings the "
             f"larger batch closer to kappa 1 than the unchanged hyperparameters at kappa {', '.join(map(str, closer)) or 'none'}")
    if worse:
        text += (f"; at kappa {', '.join(map(str, worse))}, far past the critical batch, the rule's extrapolated "
                 "hyperparameters (beta1 = 1 - kappa (1 - 0.9), lr x sqrt(kappa)) train worse than the unchanged ones: "
                 "the rule is derived for batches below the critical batch and only there does it carry a run over")
    text += (". Measured critical batches at this point: Adam " + str(s["critical_batch"]) + ", RAdam "
             + str(sde["radam"]["summary"]["critical_batch"]) + ", AdaBound (derived rule) "
             + str(sde["adabound"]["summary"]["critical_batch"]) + ". SVAG (l = 2, 4) agrees with kappa 1 within the "
             "tolerance for " + (", ".join(k for k, v in svag.items() if v) or "none")
             + (f" and not for {', '.join(k for k, v in svag.items() if not v)}" if not all(svag.values()) else "")
             + ": the SDE approximation describes these runs at the reference batch. ")
    ok = bool(holds) and min(holds) == 2 and 2 in closer and all(svag.values())
    return text + ("The claim reproduces: below the critical batch the curves line up per token with the rule, "
                   "less well without it, and stop lining up past it." if ok else
                   "The claim reproduces only in part (see the gaps above).")


def _noise_verdict(early: dict, warm: dict) -> str:
    ce, cw = early["summary"]["critical_batch"], warm["summary"]["critical_batch"]
    ne, nw = early["start"]["noise_scale"], warm["start"]["noise_scale"]
    if ne is None or nw is None:
        return "The noise scale was not measured at one of the points."
    grew = cw >= ce and nw > ne
    within = all(0.25 <= c / n <= 4 for c, n in ((ce, ne), (cw, nw)))
    return (f"B_noise grew from {ne:.1f} to {nw:.1f} samples and the measured critical batch from {ce} to {cw}: "
            + ("both move together" if grew else "they do not move together")
            + ("; the measured critical batch is within a factor 4 of B_noise at both points, so the noise scale "
               "that train.py logs is a usable predictor of where the rules break." if within else
               "; at one point the measured critical batch is more than a factor 4 from B_noise."))


def _bounds_text(ab: dict) -> str:
    shipped = ab["full"]["shipped"]["clipped"]
    best = ab["full"]["best"]["clipped"]
    s_end = shipped[-1] if shipped else (0, math.nan, math.nan)
    b_end = best[-1] if best else (0, math.nan, math.nan)
    b_mid = best[len(best) // 2] if best else (0, math.nan, math.nan)
    f, g = ab["best"]["final_lr"], ab["best"]["gamma"]
    return (f"With final_lr 0.1 (an SGD lr for image models) the upper bound clips {s_end[2]:.2%} of the step sizes "
            f"by the end of the run (lower bound {s_end[1]:.1%}): lr / sqrt(v) of most of a Transformer's coordinates "
            "is far above 0.1 (their gradients are small), so AdaBound becomes SGD with momentum for nearly the whole "
            "model within the first steps, and SGD trains Transformers poorly. With final_lr "
            f"{f:g} and gamma {g:g} the bounds start wide and close slowly: at {b_mid[0]:,} tokens {b_mid[1]:.1%} of the "
            f"step sizes sit at the lower bound and {b_mid[2]:.1%} at the upper, at the end {b_end[1]:.1%} and "
            f"{b_end[2]:.1%}. The lower bound lifts the coordinates with the largest second moments (the smallest "
            "Adam steps) to an SGD-like step, the rest keep Adam's: the passage from Adam to SGD is under way from "
            f"below, and at gamma {g:g} the bounds reach within 10% of final_lr only after about "
            f"{10 / g:,.0f} steps, far past this run. Lower lr (1e-3) with the same bounds puts half the steps "
            "on the lower bound and trains worse; higher lr (1e-2) clips half at the upper bound and trains worse too.")


def _gen_verdict(gen: dict) -> str:
    m = {k: sum(r["test_acc"] for r in v) / len(v) for k, v in gen["rows"].items()}
    order = sorted(m, key=m.get, reverse=True)
    claim = m["AdaBound"] >= m["Adam"] and m["AMSBound"] >= m["Adam"]
    close_sgd = m["AdaBound"] >= m["SGDM"] - 0.01
    sd = max((sum((r["test_acc"] - m[k]) ** 2 for r in v) / max(1, len(v) - 1)) ** 0.5 for k, v in gen["rows"].items())
    adaptive = [m[k] for k in ("Adam", "AdaBound", "AMSBound")]
    return (f"Held-out accuracy, best first: {', '.join(f'{k} {m[k]:.3f}' for k in order)} (seed-to-seed standard "
            f"deviation up to {sd:.3f}). The paper's claim (AdaBound/AMSBound generalise at least as well as Adam and "
            "close to SGDM) " + ("reproduces" if claim and close_sgd else "does not reproduce" if not claim
                                 else "reproduces in part") + " on this task"
            + (f": Adam, AdaBound and AMSBound lie within {max(adaptive) - min(adaptive):.3f} of each other, well inside "
               f"the seed noise, and SGDM is ahead of all three by {m['SGDM'] - max(adaptive):.3f}. Every optimizer fits "
               "the noisy training labels completely, so the held-out gap is the regularisation each one's "
               "trajectory gives, and here the bounds' passage to SGD did not buy SGD's." if m["SGDM"] > max(adaptive)
               else "."))


def _radam_verdict(ra: dict) -> str:
    rows = ra["rows"]

    def losses(prefix: str) -> dict[float, float]:
        return {r["lr"]: r["eval_loss"] for r in rows if r["variant"].startswith(prefix)}

    radam, adam0, adamw = losses("RAdam"), losses("Adam, no warmup"), losses("Adam, warmup")
    high = [lr for lr in sorted(radam) if lr >= 1e-2]
    wins_high = all(radam[lr] < adam0[lr] for lr in high)
    best = {name: min(d.items(), key=lambda kv: kv[1]) for name, d in
            (("RAdam", radam), ("Adam without warmup", adam0), ("Adam with warmup", adamw))}
    degrade = {name: d[max(d)] - min(d.values()) for name, d in
               (("RAdam", radam), ("Adam without warmup", adam0), ("Adam with warmup", adamw))}
    text = ("Best lr and loss: " + ", ".join(f"{n} {lr:g} ({v:.4f})" for n, (lr, v) in best.items())
            + ". Loss at the largest lr above each variant's best: "
            + ", ".join(f"{n} +{v:.3f}" for n, v in degrade.items()) + ". ")
    steadier = degrade["RAdam"] < min(degrade["Adam without warmup"], degrade["Adam with warmup"])
    text += (f"At the large lrs ({', '.join(f'{lr:g}' for lr in high)}) RAdam without warmup "
             + ("beats Adam without warmup at every one" if wins_high else "does not beat Adam without warmup everywhere")
             + (", and it loses the least at the largest lr: the rectification acts as the warmup the paper says "
                "it is. " if steadier else ". "))
    text += ("At small lrs RAdam is far behind: with beta2 = 0.999 its rectification term r_t is 0.15 at step 50, "
             "0.24 at step 122 (the end of these runs) and 0.83 only at step 2,000, so it takes about a fifth of "
             "Adam's step throughout and needs a larger lr. The claim (robust to the lr without warmup, as good as Adam with "
             "a tuned warmup) therefore reproduces in part here: robustness to large lrs yes, "
             + ("matching Adam with warmup at its best lr yes." if best["RAdam"][1] <= best["Adam with warmup"][1] * 1.01
                else f"matching Adam with warmup at the best lr no ({best['RAdam'][1]:.4f} vs "
                     f"{best['Adam with warmup'][1]:.4f}) in a run this short."))
    return text


def machine() -> str:
    import os
    import platform

    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "science", help="figures and results.json")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "science.md")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--render", action="store_true", help="only rewrite the report from OUT/results.json")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if not args.render:
        res["machine"] = machine()
        res.setdefault("seconds", {})
        for name in args.sections:
            t0 = time.perf_counter()
            log(f"section {name}")
            res[name] = globals()[f"section_{name}"](args.out)
            res["seconds"][name] = time.perf_counter() - t0
            write_text(str(path), json.dumps(res, indent=1))
        shutil.rmtree(args.out / "runs", ignore_errors=True)  # the training runs; their numbers are in results.json
        for branches in args.out.glob("check_*/branches"):
            shutil.rmtree(branches, ignore_errors=True)
    write_text(str(args.md), render(res, args.out, args.md))
    log(f"wrote {args.md}")


if __name__ == "__main__":
    main()
