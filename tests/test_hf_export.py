"""The trained model leaves bigbatch as a Hugging Face model, and one starts a run: ``bigbatch export``
from ZeRO-3 and FSDP2 checkpoints, ``checkpoint.export_hf``, ``model.init_from`` (with a resume),
``bigbatch eval`` (lm-evaluation-harness on a local task) and W&B offline logging.

Processes launched, shared by every test through module fixtures: a 2-process ZeRO-3 run (exports
itself, logs to W&B offline) and a 1-process FSDP2 run side by side, one fresh Python that loads both
exports with ``transformers`` alone, a 1-process FSDP2 run initialised from the ZeRO-3 export and its
resume, and ``bigbatch eval``. ``bigbatch export`` of the FSDP2 run and bad inputs run in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from train_common import PLOT, PY, REPO, TORCHRUN, check_ok, env, main, records, run, small_args

from bigbatch.data import shards

STEPS = 6


def _popen(cmd: list[str], wandb_dir: Path | None = None) -> subprocess.Popen:
    e = env()
    if wandb_dir is not None:
        e = {**e, "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    e.pop("WANDB_MODE", None)  # the default, offline, is what is tested
    return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, Path]:
    """The same tiny config (fixed batch 8, STEPS steps) as a 2-process ZeRO-3 run that exports itself
    to RUN/hf and logs to W&B, and a 1-process FSDP2 run; started together."""
    root = tmp_path_factory.mktemp("export")
    common = ["train.py", "--config", "configs/tiny.yaml", *small_args(cache), "--train.max_steps", str(STEPS)]
    # one process builds the tokenizer and token cache first, so the two runs do not race for it
    z3 = _popen(TORCHRUN + common + ["--out", str(root / "z3"), "--deepspeed.zero_stage", "3",
                                     "--checkpoint.export_hf", "true", "--logging.wandb", "true",
                                     "--logging.wandb_project", "bb-test", *PLOT], wandb_dir=root)
    fsdp = _popen([PY, *common, "--out", str(root / "fsdp"), "--train.engine", "fsdp2"])
    z3, fsdp = _wait(z3), _wait(fsdp)
    check_ok(z3)
    check_ok(fsdp)
    return {"root": root, "z3": root / "z3", "fsdp": root / "fsdp", "stdout": {"z3": z3.stdout, "fsdp": fsdp.stdout}}


@pytest.fixture(scope="module")
def exports(runs) -> dict[str, Path]:
    """``bigbatch export`` of the FSDP2 run (small shards, so the index is written); the ZeRO-3 run
    exported itself at its end."""
    from bigbatch.cli import main as cli_main

    out = runs["root"] / "fsdp_hf"  # in this process: no training world, no GPU
    assert cli_main(["export", str(runs["fsdp"]), "--out", str(out), "--max-shard-size", "40KB"]) == 0
    return {"z3": runs["z3"] / "hf", "fsdp": out}


# a fresh interpreter that knows nothing of bigbatch: transformers, numpy and the run's token cache
_CHECK = r"""
import json, sys
import numpy as np, torch, yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
z3_dir, fsdp_dir, run_dir = sys.argv[1:4]
models = {d: AutoModelForCausalLM.from_pretrained(d).eval() for d in (z3_dir, fsdp_dir)}
tok = AutoTokenizer.from_pretrained(z3_dir)
ids = torch.tensor([tok("def main(argv=None):\n    return 0\n")["input_ids"]])
with torch.no_grad():
    a, b = (models[d](input_ids=ids).logits for d in (z3_dir, fsdp_dir))
cfg = yaml.safe_load(open(run_dir + "/config.resolved.yaml"))
cache = cfg["resolved"]["data_cache"]
val = np.asarray(json.loads(sys.argv[4]), dtype=np.int64)  # the run's held-out blocks (first eval_blocks)
x = torch.from_numpy(val)
with torch.no_grad():
    eval_loss = float(models[z3_dir](input_ids=x, labels=x).loss)
gen = models[z3_dir].generate(ids, max_new_tokens=4, do_sample=False)
print(json.dumps({"rel": float((a - b).norm() / b.norm()), "max_rel": float((a - b).abs().max() / b.abs().max()),
                  "shape": list(a.shape), "eval_loss": eval_loss, "generated": gen.shape[1] - ids.shape[1],
                  "bigbatch": any(m.startswith("bigbatch") for m in sys.modules), "vocab": len(tok)}))
"""


def held_out_blocks(run_dir: Path) -> list:
    """The first ``train.eval_blocks`` held-out blocks of a run (what its evaluations read), as lists."""
    cfg = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    src = shards.open_source(cfg["resolved"]["data_cache"], "corpus", "data", check_hashes=False)
    _, val = src.blocks(cfg["data"]["seq_len"], cfg["data"]["val_fraction"], "data", arrays=True)
    src.close()
    return np.asarray(val[:cfg["train"]["eval_blocks"]]).tolist()


@pytest.mark.slow
def test_zero3_and_fsdp2_exports_agree_and_load_without_bigbatch(runs, exports):
    for d in exports.values():
        names = set(os.listdir(d))
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names, names
    assert "model.safetensors" in os.listdir(exports["z3"])
    assert "model.safetensors.index.json" in os.listdir(exports["fsdp"])  # sharded at 40KB
    shards = [n for n in os.listdir(exports["fsdp"]) if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) >= 2
    proc = run([PY, "-c", _CHECK, str(exports["z3"]), str(exports["fsdp"]), str(runs["z3"]),
                json.dumps(held_out_blocks(runs["z3"]))])
    check_ok(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["bigbatch"] and got["generated"] == 4 and got["shape"][-1] >= got["vocab"]
    # the same training on 2 ZeRO-3 ranks and 1 FSDP2 rank: the same model within fp32 reduction order
    assert got["rel"] < 1e-5 and got["max_rel"] < 1e-5, got
    # the export's loss on the run's held-out blocks is the run's last eval loss
    last = records(runs["z3"], "eval")[-1]
    assert last["step"] == STEPS
    assert got["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_the_banner_counts_zero3_partitioned_parameters(runs):
    """ZeRO-3 partitions every parameter (its local tensor is empty): the banner counts them whole."""
    def params(name: str) -> str:
        return next(ln for ln in runs["stdout"][name].splitlines() if ln.startswith("bigbatch: ")).split(" | ")[0]

    assert params("z3") == params("fsdp") and params("z3") != "bigbatch: 0.00M params", params("z3")


@pytest.mark.slow
def test_run_dir_carries_tokenizer_and_exports_anywhere(runs, tmp_path):
    from bigbatch.training.export import export_run

    for name in ("z3", "fsdp"):
        assert (runs[name] / "tokenizer" / "tokenizer.json").is_file() and (runs[name] / "hf_config.json").is_file()
    moved = tmp_path / "moved"
    shutil.copytree(runs["z3"], moved, ignore=shutil.ignore_patterns("hf", "wandb"))
    out = export_run(str(moved), str(tmp_path / "m"))
    assert json.loads((Path(out) / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "moved"]  # no temporary left


@pytest.fixture(scope="module")
def continued(runs, cache) -> dict:
    """A 1-process FSDP2 run initialised from a copy of the ZeRO-3 export (eval at step 0), then the
    copy moved away and the run resumed: the run directory is self-contained (its checkpoint, model
    config and tokenizer), a resume never reads init_from."""
    init = runs["root"] / "init"
    shutil.copytree(runs["z3"] / "hf", init)
    out = runs["root"] / "cont"
    args = ["train.py", "--config", "configs/tiny.yaml", *small_args(cache), "--model.init_from", str(init),
            "--train.eval_at_start", "true", "--train.engine", "fsdp2", "--optim.hparams.lr", "2e-3"]
    first = run([PY, *args, "--out", str(out), "--train.max_steps", "4"])
    check_ok(first)
    evals_first = records(out, "eval")
    resolved_first = yaml.safe_load((out / "config.resolved.yaml").read_text())
    init.rename(runs["root"] / "init-moved")
    resumed = run([PY, "train.py", "--resume", str(out), "--train.max_steps", "6"])
    check_ok(resumed)
    return {"out": out, "evals_first": evals_first, "init": init, "resolved_first": resolved_first}


@pytest.mark.slow
def test_init_from_an_export_continues_where_the_source_ended(runs, continued):
    source_last = records(runs["z3"], "eval")[-1]["eval_loss"]
    evals = continued["evals_first"]
    assert evals[0]["step"] == 0
    assert evals[0]["eval_loss"] == pytest.approx(source_last, rel=1e-5)
    assert evals[-1]["step"] == 4 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # the run took the export's architecture and tokenizer
    first = continued["resolved_first"]
    assert first["model"]["init_from"] == str(continued["init"])
    assert first["tokenizer"] == {**first["tokenizer"], "kind": "pretrained", "path": str(continued["init"])}
    # the resume (init_from moved away) took the run's own model config and tokenizer
    resolved = yaml.safe_load((continued["out"] / "config.resolved.yaml").read_text())
    assert resolved["model"] == first["model"]  # init_from is still recorded
    assert resolved["tokenizer"]["path"] == str(continued["out"] / "tokenizer")
    # the resume loaded its checkpoint and went on to step 6
    steps = [r["step"] for r in records(continued["out"])]
    assert steps == list(range(1, 7))


_TASK = """task: tiny_python_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_on_an_export(exports, tmp_path):
    data = tmp_path / "mc.jsonl"
    rows = [{"prompt": "def f(x):\n    return", "choices": [" x", " ]]]("], "answer": 0},
            {"prompt": "import", "choices": [" os", " ((("], "answer": 0},
            {"prompt": "for i in", "choices": [" range(10):", " :::"], "answer": 0},
            {"prompt": "class A", "choices": ["(object):", "))))"], "answer": 0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_python_mc.yaml").write_text(_TASK.format(data=data))
    result = tmp_path / "results.json"
    proc = run([PY, "-m", "bigbatch.cli", "eval", str(exports["z3"]), "--tasks", "tiny_python_mc",
                "--include-path", str(tasks), "--batch-size", "4", "--out", str(result)])
    check_ok(proc)
    got = json.loads(result.read_text())
    acc = got["tiny_python_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    print(f"lm-eval tiny_python_mc acc: {acc}")


def test_eval_bad_input_exit_2(tmp_path, capsys):
    from bigbatch.cli import main as cli_main

    assert cli_main(["eval", str(tmp_path / "none"), "--tasks", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DIR:") and "no config.json" in err and len(err.splitlines()) == 1
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert cli_main(["eval", str(tmp_path / "m"), "--tasks", "x", "--include-path", str(tmp_path / "no")]) == 2
    assert capsys.readouterr().err.startswith("error: --include-path:")


def _wandb_records(run_dir: Path) -> list:
    """The protobuf records of the offline W&B run under ``run_dir/wandb``: its ``.wandb`` file is a
    LevelDB-style log (a 7-byte file header, then 32 KiB blocks of chunks with a 7-byte header: CRC,
    length, type full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf += chunk
        if kind in (1, 4):  # full, last
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
        elif kind == 2:  # first
            buf = chunk
    return out


def _wandb_history(run_dir: Path) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            for rec in _wandb_records(run_dir) if rec.WhichOneof("record_type") == "history"]


@pytest.mark.slow
def test_wandb_offline_run_holds_the_training_records(runs):
    history = _wandb_history(runs["z3"])
    train = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in train] == list(range(1, STEPS + 1))
    jsonl = records(runs["z3"])
    assert [h["train/loss"] for h in train] == pytest.approx([r["loss"] for r in jsonl], rel=1e-12)
    assert any("train/noise_scale" in h for h in history)  # 2 ranks measure it
    evals = [h for h in history if "eval/eval_loss" in h]
    assert evals[-1]["eval/eval_loss"] == pytest.approx(records(runs["z3"], "eval")[-1]["eval_loss"])
    assert any(h.get("loss_plot/_type") == "image-file" for h in history)  # loss.png, at the end
    assert list(runs["z3"].glob("wandb/offline-run-*/files/media/images/loss_plot_*.png"))
    (meta,) = [r.run for r in _wandb_records(runs["z3"]) if r.WhichOneof("record_type") == "run"]
    assert meta.project == "bb-test" and meta.display_name == "z3"
    config = {u.key: json.loads(u.value_json) for u in meta.config.update}
    assert config["deepspeed"]["zero_stage"] == 3 and config["resolved"]["world_size"] == 2


# ------------------------------------------------------------------ bad input, in-process


def test_export_bad_input_exit_2(tmp_path, capsys):
    from bigbatch.training.export import main as export_main

    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    assert export_main([str(empty_run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: RUN_DIR:") and "no good checkpoint" in err and len(err.splitlines()) == 1
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    assert export_main([str(empty_run), "--out", str(full)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out:") and "not empty" in err and "--overwrite" in err
    assert export_main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "RUN_DIR:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "run"]  # nothing written


@pytest.mark.slow
def test_export_refuses_a_tag_that_is_not_good_and_overwrites(runs, exports, tmp_path, capsys):
    from bigbatch.training.export import main as export_main

    assert export_main([str(runs["z3"]), "--out", str(tmp_path / "o"), "--tag", "step99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tag: 'step99'") and f"complete tags: step{STEPS:08d} (" in err, err
    out = tmp_path / "o"
    out.mkdir()
    (out / "old").write_text("x")
    assert export_main([str(runs["z3"]), "--out", str(out), "--tag", f"step{STEPS:08d}", "--overwrite"]) == 0
    assert not (out / "old").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_init_from_bad_input_exit_2(tmp_path, cache, capsys, monkeypatch):
    from transformers import LlamaConfig, ResNetConfig

    monkeypatch.chdir(REPO)
    base = ["--config", "configs/tiny.yaml", *small_args(cache)]
    resnet = tmp_path / "resnet"
    ResNetConfig().save_pretrained(resnet)
    assert main([*base, "--out", str(tmp_path / "a"), "--model.init_from", str(resnet)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.init_from:") and "not a causal LM" in err and len(err.splitlines()) == 1

    assert main([*base, "--out", str(tmp_path / "b"), "--model.init_from", str(tmp_path / "none")]) == 2
    assert "error: model.init_from:" in capsys.readouterr().err

    # a vocabulary smaller than its tokenizer: a BPE of 512 tokens beside a 100-row embedding
    small = tmp_path / "small"
    LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(small)
    _bpe(small)
    assert main([*base, "--out", str(tmp_path / "c"), "--model.init_from", str(small)]) == 2
    err = capsys.readouterr().err
    assert "model.init_from:" in err and "vocab_size 100, smaller than its tokenizer's" in err

    # the config's model section disagrees with the model: named
    agree = tmp_path / "agree"
    LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(agree)
    assert main([*base, "--out", str(tmp_path / "d"), "--model.init_from", str(agree), "--model.num_layers", "3"]) == 2
    err = capsys.readouterr().err
    assert "model.num_layers=3 but the model has 1" in err and "model.hidden_size" not in err
    assert not any((tmp_path / d).exists() for d in "abcd")


def _bpe(path: Path) -> None:
    from bigbatch.data.tokenizer import train_bpe

    train_bpe(["def f(x): return x + 1\n" * 50, "import os, sys\n" * 50], 300, str(path / "tok"))
    for f in (path / "tok").iterdir():
        f.rename(path / f.name)


def test_wandb_missing_is_exit_2_before_any_work(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package sees
    assert main(["--config", "configs/tiny.yaml", *small_args(cache), "--out", str(tmp_path / "w"),
                 "--logging.wandb", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: logging.wandb:") and "bigbatch[wandb]" in err
    assert not (tmp_path / "w").exists()
