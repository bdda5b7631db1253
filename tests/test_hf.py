"""bigbatch.hf: HF Trainer and Accelerate with AdaBound/AMSBound/RAdam, DeepSpeed configs, scaling rules.

Real runs: tests/hf_worker.py under torchrun (1 and 2 gloo processes, with and without DeepSpeed
ZeRO-2; every case in one launch per world size) and examples/accelerate_train.py under
``accelerate launch`` (2 processes, with and without the DeepSpeed plugin).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigbatch.hf import (BigBatchTrainingArguments, ScalingRulesCallback, format_optim_args, optimizer_cls_and_kwargs,
                         parse_optim_args, split_optimizer_block)
from bigbatch.optim import AdaBound, AMSBound, RAdam
from bigbatch.scaling import scale_hparams
from bigbatch.sharding import DSConfigError
from train_common import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO)}
for _k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
    ENV.pop(_k, None)


def _run(cmd, timeout=300):
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout}s:\n{(exc.stdout or b'')[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def _args(tmp_path, **kw):
    kw.setdefault("report_to", [])
    return BigBatchTrainingArguments(output_dir=str(tmp_path / "out"), **kw)


# --- names, optim_args and errors (no launch) --------------------------------------------------------------


def test_optim_by_name_and_optim_args(tmp_path):
    args = _args(tmp_path, optim="AMSBound", optim_args="final_lr=0.2, gamma=2e-3", learning_rate=1e-3,
                 adam_beta1=0.8, adam_epsilon=1e-7)
    assert args.bigbatch_optim == "amsbound"
    cls, kw = optimizer_cls_and_kwargs(args.bigbatch_optim, args)
    assert cls is AMSBound
    assert kw == {"lr": 1e-3, "betas": (0.8, 0.999), "eps": 1e-7, "final_lr": 0.2, "gamma": 2e-3}
    extra = {"final_lr": 0.2, "gamma": 2e-3, "amsbound": True}
    assert parse_optim_args(format_optim_args(extra), AdaBound) == extra


def test_a_class_path_is_built_by_bigbatch(tmp_path):
    args = _args(tmp_path, optim="torch.optim.NAdam", learning_rate=2e-3, adam_beta1=0.8)
    assert args.bigbatch_optim == "torch.optim.NAdam" and args.optim == "adamw_torch"
    cls, kw = optimizer_cls_and_kwargs(args.bigbatch_optim, args)
    assert cls is torch.optim.NAdam and kw["lr"] == 2e-3 and kw["betas"] == (0.8, 0.999)


def test_plain_trainer_optimizer_cls_and_kwargs_keeps_decay_groups(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, weight_decay=0.1, report_to=[],
                             optim_args="degenerated_to_sgd=false", use_cpu=True)
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("radam", args))
    opt = trainer.create_optimizer()
    assert type(opt) is RAdam
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # Linear weight | Linear bias, LayerNorm w, b
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["degenerated_to_sgd"] is False


@pytest.mark.parametrize("kwargs, match", [
    (dict(optim="adabund"), r"optim='adabund': unknown; bigbatch's are \['adabound', 'amsbound', 'radam'\]"),
    (dict(optim="adabound", optim_args="final_lr=-1"), r"final_lr: -1"),
    (dict(optim="adabound", optim_args="gamma=1.5"), r"gamma: 1.5"),
    (dict(optim="adabound", optim_args="gamma=abc"), r"gamma='abc' is not a number"),
    (dict(optim="radam", optim_args="final_lr=0.1"), r"RAdam takes no 'final_lr'; allowed: \["),
    (dict(optim="adabound", optim_args="lr=0.1"), r"lr is set by the training argument learning_rate"),
    (dict(optim="adabound", optim_args="amsbound=maybe"), r"amsbound='maybe' is not a boolean"),
    (dict(optim="radam", learning_rate=-1.0), r"RAdam\(lr=-1.0.*lr"),
    (dict(optim="adabound", reference_batch_size=0), r"reference_batch_size: expected an int >= 1, got 0"),
])
def test_bad_names_and_hparams(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kwargs)


def test_bad_name_in_factory():
    with pytest.raises(ValueError, match=r"unknown name 'adabund'; known names are \['adabound'"):
        optimizer_cls_and_kwargs("adabund")
    with pytest.raises(ValueError, match=r"AdaBound takes no 'momentum' here"):
        optimizer_cls_and_kwargs("adabound", momentum=0.9)


# --- DeepSpeed configs ----------------------------------------------------------------------------------------


def _ds(block):
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
            "optimizer": block}


def test_split_optimizer_block_our_types_only(tmp_path):
    cfg, block = split_optimizer_block(_ds({"type": "AdaBound", "params": {"lr": "auto", "gamma": 0.01}}))
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True
    assert block.name == "adabound" and block.params == {"lr": "auto", "gamma": 0.01}
    cfg, block = split_optimizer_block(_ds({"type": "AdamW", "params": {"lr": 1e-3}}))
    assert block is None and cfg["optimizer"]["type"] == "AdamW"  # DeepSpeed's own: left to it
    cfg, block = split_optimizer_block(str(REPO / "configs/deepspeed/zero3_offload.json"), "radam")
    assert block.name == "radam" and cfg["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(DSConfigError, match=r"optimizer.params.final_lr: RAdam does not take it"):
        split_optimizer_block(_ds({"type": "RAdam", "params": {"final_lr": 0.1}}))
    with pytest.raises(DSConfigError, match=r"optimizer.type=\"auto\": name the optimizer"):
        split_optimizer_block(_ds({"type": "auto"}))


def test_ds_block_auto_filled_like_the_trainer(tmp_path):
    ds = _ds({"type": "AMSBound", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto",
                                              "final_lr": "auto", "gamma": 0.003}})
    args = _args(tmp_path, deepspeed=ds, optim_args="final_lr=0.2", learning_rate=1e-3, weight_decay=0.05)
    assert args.bigbatch_optim == "amsbound" and "optimizer" not in args.hf_deepspeed_config.config
    assert args.hf_deepspeed_config.config["zero_allow_untested_optimizer"] is True
    cls, kw = optimizer_cls_and_kwargs(args.bigbatch_optim, args)
    assert cls is AMSBound and kw == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "final_lr": 0.2, "gamma": 0.003}


@pytest.mark.parametrize("params, extra, match", [
    ({"lr": 0.1}, {}, r"optimizer.params.lr=0.1 in the DeepSpeed config but the training argument learning_rate=5e-05"),
    ({"final_lr": 0.3}, {"optim_args": "final_lr=0.2"}, r"optimizer.params.final_lr=0.3 .* contradicts optim_args"),
    ({"nope": 1}, {}, r"optimizer.params.nope: AdaBound does not take it"),
])
def test_ds_block_errors(tmp_path, params, extra, match):
    with pytest.raises(DSConfigError, match=match):
        _args(tmp_path, deepspeed=_ds({"type": "AdaBound", "params": params}), **extra)


def test_ds_block_name_conflict_and_use_cpu(tmp_path):
    with pytest.raises(ValueError, match=r"optim='radam' but the DeepSpeed config's optimizer.type names 'adabound'"):
        _args(tmp_path, optim="radam", deepspeed=_ds({"type": "AdaBound"}))
    with pytest.raises(ValueError, match=r"use_cpu=True with deepspeed"):
        _args(tmp_path, optim="radam", use_cpu=True, deepspeed=_ds({"type": "auto"}))


# --- scaling callback -----------------------------------------------------------------------------------------


def test_scaling_callback_values(tmp_path):
    args = _args(tmp_path, optim="adabound", optim_args="final_lr=0.1,gamma=0.001,decoupled_weight_decay=true",
                 learning_rate=1e-3, weight_decay=0.1, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                 max_steps=1000, warmup_steps=100, use_cpu=True)
    cb = ScalingRulesCallback(reference_batch_size=4)
    applied = cb.apply(args)  # world size 1 here: global batch 16, kappa 4
    want = scale_hparams("adabound", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
                                      "final_lr": 0.1, "gamma": 0.001, "decoupled_weight_decay": True}, 4.0)
    assert applied.kappa == 4.0 and applied.global_batch == 16
    assert math.isclose(args.learning_rate, 2e-3) and (args.adam_beta1, args.adam_beta2) == want["betas"]
    assert math.isclose(args.adam_epsilon, 5e-9) and math.isclose(args.weight_decay, 0.2)  # decoupled: x sqrt(kappa)
    assert (args.max_steps, args.warmup_steps) == (250, 25)
    _, kw = optimizer_cls_and_kwargs("adabound", args)
    assert math.isclose(kw["final_lr"], 0.2) and math.isclose(kw["gamma"], 0.004)  # final_lr x sqrt(kappa)
    with pytest.raises(RuntimeError, match="already scaled once"):
        cb.apply(args)


def test_scaling_callback_refuses_invalid_beta(tmp_path):
    args = _args(tmp_path, optim="radam", per_device_train_batch_size=44, use_cpu=True)
    with pytest.raises(ValueError, match=r"beta_form=.power."):
        ScalingRulesCallback(reference_batch_size=4).apply(args)  # kappa 11: 1 - 11 * 0.1 < 0


# --- real runs ------------------------------------------------------------------------------------------------


def _check_trainer_results(out: Path, cases, world):
    for case in cases:
        res = json.loads((out / f"{case}.json").read_text())
        assert res["world_size"] == world and res["kappa"] == world
        assert res["optimizer"] == {"adabound": "AdaBound", "radam": "RAdam", "amsbound_zero2": "AMSBound"}[case]
        assert res["deepspeed"] == (case == "amsbound_zero2")
        losses = [res["losses"][str(s)] for s in range(1, res["steps"] + 1)]
        assert losses[-1] < losses[0] - 0.1, f"{case}: {losses}"
        assert res["resume_max_abs_diff"] < 1e-4
        for k, v in res["expected"].items():
            if k in res["hparams"] and k != "weight_decay":
                assert res["hparams"][k] == pytest.approx(v, rel=1e-12), (case, k)


@pytest.mark.slow
def test_trainer_one_process(tmp_path):
    cases = ["adabound", "radam", "amsbound_zero2"]
    _run([BIN / "torchrun", "--nproc_per_node", "1", "--master_port", str(free_port()), "tests/hf_worker.py",
          str(tmp_path), *cases])
    _check_trainer_results(tmp_path, cases, 1)


@pytest.mark.slow
def test_trainer_two_processes(tmp_path):
    # The DeepSpeed dict config under torchrun on CPU: the "4 != 4 * 1 * 2" trap must not come back.
    cases = ["adabound", "amsbound_zero2"]
    _run([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "tests/hf_worker.py",
          str(tmp_path), *cases])
    _check_trainer_results(tmp_path, cases, 2)


@pytest.mark.parametrize("launch, optimizer, zero", [
    (["--multi_gpu"], "adabound", None),
    (["--use_deepspeed", "--deepspeed_config_file", "configs/deepspeed/zero2.json"], "amsbound", 2),
], ids=["ddp", "deepspeed_zero2"])
@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path, launch, optimizer, zero):
    out = tmp_path / "result.json"
    _run([BIN / "accelerate", "launch", *launch, "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "examples/accelerate_train.py",
          "--optimizer", optimizer, "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["is_ours"] and res["optimizer"] == {"adabound": "AdaBound", "amsbound": "AMSBound"}[optimizer]
    assert res["num_processes"] == 2 and res["kappa"] == 2.0
    assert res["distributed_type"] == ("DistributedType.DEEPSPEED" if zero else "DistributedType.MULTI_CPU")
    assert res["zero_stage"] == zero and res["ds_world_size"] == (2 if zero else None)
    assert [g["weight_decay"] for g in res["param_groups"]] == [res["expected"]["weight_decay"], 0.0]
    for k in ("lr", "betas", "eps", "final_lr", "gamma"):
        assert res["param_groups"][0][k] == pytest.approx(res["expected"][k], rel=1e-12), k
    assert res["param_groups"][0]["amsbound"] is (optimizer == "amsbound")
    assert res["losses"][-1] < res["losses"][0] - 0.5, res["losses"]


# --- batch schedule through gradient accumulation ----------------------------------------------------------------


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": torch.nn.functional.mse_loss(self.lin(x), y)}


@pytest.mark.slow
def test_batch_schedule_callback_grows_accumulation_and_rescales(tmp_path):
    from bigbatch.hf import BatchScheduleCallback, BigBatchTrainer
    from transformers import TrainerCallback

    class Count(TrainerCallback):
        micro = 0
        per_step: list = []

        def on_substep_end(self, args, state, control, **kw):
            self.micro += 1

        def on_step_end(self, args, state, control, **kw):
            self.per_step.append(self.micro + 1)
            self.micro = 0

    gen = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=gen), "y": torch.randn(1, generator=gen)} for _ in range(64)]
    args = _args(tmp_path, optim="adabound", optim_args="final_lr=0.1,gamma=1e-3", learning_rate=1e-3,
                 adam_beta1=0.9, adam_beta2=0.99, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 num_train_epochs=1, lr_scheduler_type="constant", use_cpu=True, save_strategy="no",
                 logging_strategy="no")
    schedule, count = BatchScheduleCallback([[0, 4], [16, 8]]), Count()
    trainer = BigBatchTrainer(model=_Regression(), args=args, train_dataset=data, callbacks=[schedule, count])
    trainer.train()
    # 4 steps of 2 x 2 micro batches, then 6 steps of 2 x 4: every sample once
    assert count.per_step == [2] * 4 + [4] * 6 and trainer.state.global_step == 10
    assert [(c["step"], c["samples"], c["old_global_batch"], c["global_batch"]) for c in schedule.changes] == \
        [(4, 16, 4, 8)]
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3 * 2**0.5) and group["betas"] == pytest.approx((0.8, 0.98))
    assert group["final_lr"] == pytest.approx(0.1 * 2**0.5) and group["gamma"] == pytest.approx(2e-3)
    steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {4 / 2 + 6}  # the counters moved to samples / new batch at the change
    saved = schedule.state()["attributes"]
    assert (saved["samples"], saved["global_batch"], saved["history"]) == (64, 8, [[0, 0, 4], [4, 16, 8]])
    assert (saved["micro_in_epoch"], saved["epochs_done"], saved["pending"]) == (32, 1, None)
    with pytest.raises(ValueError, match=r"batch_schedule\[1\]: global batch 6 must be a multiple"):
        BigBatchTrainer(model=_Regression(), args=_args(tmp_path, optim="adabound", per_device_train_batch_size=4,
                                                        use_cpu=True, save_strategy="no"),
                        train_dataset=data, callbacks=[BatchScheduleCallback([[0, 4], [16, 6]])]).train()


# --- unmodified scripts: bigbatch.hf.run and install() ----------------------------------------------------------

# An HF example-style script (as transformers' examples/pytorch/language-modeling/run_clm.py is built), written
# here so that nothing comes from the hub: three argument dataclasses, a plain Trainer, a tiny Llama from a
# config, a small local text set. EDIT is the documented edit (bigbatch's classes under the same names).
SCRIPT = '''
import json, logging, sys
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed
EDIT

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    hidden_size: int = field(default=32, metadata={"help": "model width"})


@dataclass
class DataTrainingArguments:
    text_file: str = field(default=None, metadata={"help": "a local text file, one sample a line"})
    block_size: int = field(default=16)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.process_index == 0:
        logger.info(f"Training/evaluation parameters {training_args}")
    set_seed(training_args.seed)
    text = open(data_args.text_file).read()
    vocab = sorted(set(text))
    ids = [vocab.index(c) for c in text]
    n = data_args.block_size
    blocks = [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]
    train = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=model_args.hidden_size,
                                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=n))
    trainer = Trainer(model=model, args=training_args, train_dataset=train)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        print("RESULT " + json.dumps({"losses": losses, "steps": trainer.state.global_step}), flush=True)


if __name__ == "__main__":
    main()
'''
EDITED = "from bigbatch.hf import BigBatchTrainer as Trainer, BigBatchTrainingArguments as TrainingArguments"


def _scripts(tmp_path) -> tuple[Path, Path, Path]:
    plain, edited = tmp_path / "run_clm_like.py", tmp_path / "run_clm_like_edited.py"
    plain.write_text(SCRIPT.replace("EDIT\n", ""))
    edited.write_text(SCRIPT.replace("EDIT", EDITED))
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"the {w} sat on the {v} mat." for w in ("cat", "dog", "bird", "fox") * 12
                             for v in ("red", "blue")))
    return plain, edited, text


def _script_args(tmp_path, name, text, *extra):
    return ["--text_file", str(text), "--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "4",
            "--max_steps", "8", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--learning_rate", "3e-3", "--reference_batch_size", "4", "--disable_tqdm", "true", *extra]


def _result(proc) -> dict:
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _ds_file(tmp_path) -> Path:
    path = tmp_path / "ds_adabound.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                "zero_optimization": {"stage": 2},
                                "optimizer": {"type": "AdaBound", "params": {"lr": "auto", "final_lr": 10.0}}}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_unmodified_script_through_the_runner(tmp_path, nproc):
    """The script unedited under the runner (DDP, then ZeRO-2 from a DeepSpeed JSON naming AdaBound) trains
    exactly as the edited script does; the argument log and the start line name AdaBound."""
    plain, edited, text = _scripts(tmp_path)
    ds = _ds_file(tmp_path)
    launch = [BIN / "torchrun", "--nproc_per_node", str(nproc), "--master_port"]
    out = {}
    for name, ds_args in (("ddp", ["--optim", "adabound"]), ("zero2", ["--deepspeed", str(ds)])):
        ours = ["-m", "bigbatch.hf.run", str(plain)] if nproc > 1 or name == "zero2" else None
        if ours is None:  # one process: the runner as documented first, plain python
            runner = _run([sys.executable, "-m", "bigbatch.hf.run", str(plain),
                           *_script_args(tmp_path, f"r{name}", text, *ds_args)])
        else:
            runner = _run([*launch, str(free_port()), *ours, *_script_args(tmp_path, f"r{name}", text, *ds_args)])
        edit = _run([*launch, str(free_port()), str(edited), *_script_args(tmp_path, f"e{name}", text, *ds_args)])
        out[name] = (runner, edit)
        a, b = _result(runner), _result(edit)
        assert a["steps"] == b["steps"] == 8 // nproc  # the scaling rules: kappa = nproc, same samples
        assert a["losses"].keys() == b["losses"].keys()
        for step, loss in a["losses"].items():
            assert abs(loss - b["losses"][step]) <= 1e-5, (name, step, loss, b["losses"][step])
        losses = list(a["losses"].values())
        assert losses[-1] < losses[0], losses
        log = runner.stdout + runner.stderr
        assert "optim=adabound," in log and "ADAMW_TORCH" not in log
        assert "bigbatch: optimizer AdaBound(" in log and "final_lr=" in log
        if nproc > 1:
            assert f"scaled from reference batch 4 (kappa {nproc})" in log
    logs = {name: procs[0].stdout + procs[0].stderr for name, procs in out.items()}
    assert "final_lr=10, the value tuned for Transformers" in logs["ddp"]  # said once, by process 0
    assert logs["ddp"].count("the value tuned for Transformers") == 1
    assert "under DeepSpeed ZeRO-2 at global batch" in logs["zero2"] and "under DeepSpeed" not in logs["ddp"]


def test_runner_refusals(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bigbatch.hf.run", str(tmp_path / "nope.py")], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "SCRIPT=" in proc.stderr and "nope.py" in proc.stderr


@pytest.mark.slow
def test_runner_bad_argument_one_line(tmp_path):
    plain, _, text = _scripts(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "bigbatch.hf.run", str(plain), "--text_file", str(text),
                           "--output_dir", str(tmp_path / "o"), "--optim", "adabound", "--optim_args", "gamma=2"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if "bigbatch.hf.run:" in x or "Traceback" in x]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("bigbatch.hf.run: AdaBound(") and "gamma=2" in lines[0]
    assert not (tmp_path / "o").exists()


def test_tested_transformers_range():
    import transformers

    from bigbatch.hf.patch import TESTED, UntestedTransformers, check_version

    assert check_version() == transformers.__version__
    assert check_version(TESTED[0]) == TESTED[0]
    for bad in ("4.44.2", TESTED[1] + ".0", "6.0.0"):
        with pytest.raises(UntestedTransformers, match=rf"transformers {bad}: bigbatch.hf patches the versions >= "):
            check_version(bad)


def test_install_patches_transformers_and_names_the_optimizer(tmp_path):
    import transformers
    import transformers.trainer
    import transformers.training_args

    from bigbatch.hf import BigBatchTrainer, BigBatchTrainingArguments, install
    from transformers import HfArgumentParser

    saved = (transformers.TrainingArguments, transformers.Trainer)
    try:
        install()
        assert transformers.TrainingArguments is transformers.training_args.TrainingArguments is BigBatchTrainingArguments
        assert transformers.Trainer is transformers.trainer.Trainer is BigBatchTrainer
        (args,) = HfArgumentParser(transformers.TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "amsbound", "--report_to", "none", "--use_cpu"])
    finally:
        transformers.TrainingArguments = transformers.training_args.TrainingArguments = saved[0]
        transformers.Trainer = transformers.trainer.Trainer = saved[1]
    assert args.bigbatch_optim == "amsbound" and parse_optim_args(args.optim_args, AMSBound)["final_lr"] == 10.0
    assert "\noptim=amsbound,\n" in str(args) and "ADAMW_TORCH" not in str(args)
    assert args.to_dict()["optim"] == "amsbound"


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_schedule="auto"), r"batch_schedule=auto: give --max_global_batch"),
    (dict(batch_schedule="auto", max_global_batch=64, growth_margin=-1), r"growth_margin: -1 must be a number > 0"),
    (dict(batch_schedule="auto", max_global_batch=64, growth_min_samples=-5), r"growth_min_samples -5 must be"),
    (dict(batch_schedule="[[0, 4], [8, 8"), r"batch_schedule='\[\[0, 4\], \[8, 8': expected 'auto' or a JSON list"),
    (dict(batch_schedule="[[1, 4]]"), r"schedule\[0\]: \[1, 4\] must start at samples 0"),
    (dict(batch_schedule="auto", max_global_batch=64, deepspeed=_ds({"type": "AdaBound"})),
     r"batch_schedule='auto' with deepspeed: DeepSpeed keeps its own gradient accumulation"),
])
def test_bad_batch_schedule(tmp_path, kwargs, match):
    from bigbatch.hf.trainer import BigBatchArgumentError

    with pytest.raises(BigBatchArgumentError, match=match):
        _args(tmp_path, optim="adabound", **kwargs)


def _auto_trainer(tmp_path, name, data, **kw):
    from bigbatch.hf import BigBatchTrainer

    args = _args(tmp_path / name, optim="adabound", optim_args="final_lr=0.1,gamma=1e-3", learning_rate=1e-2,
                 adam_beta2=0.99, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=48,
                 warmup_steps=2, lr_scheduler_type="cosine", use_cpu=True, logging_steps=1, save_strategy="steps",
                 save_steps=4, batch_schedule="auto", max_global_batch=16, growth_margin=1e-3, growth_patience=2,
                 seed=0, data_seed=0, disable_tqdm=True, **kw)
    return BigBatchTrainer(model=_Regression(), args=args, train_dataset=data)


@pytest.mark.slow
def test_auto_batch_schedule_grows_logs_and_resumes(tmp_path):
    from bigbatch.hf import BatchScheduleCallback

    gen = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=gen), "y": torch.randn(1, generator=gen)} for _ in range(256)]
    trainer = _auto_trainer(tmp_path, "full", data)
    trainer.train()
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, BatchScheduleCallback))
    hist = trainer.state.log_history
    changes = [h for h in hist if "batch_change/global_batch" in h]
    # measured from the first step (2 micro batches); grows 4 -> 8 -> 16 once past the warmup's 8 samples
    assert [(h["batch_change/old_global_batch"], h["batch_change/global_batch"]) for h in changes] == [(4, 8), (8, 16)]
    assert all(h["batch_change/noise_scale"] > 0 for h in changes)
    assert any("batch_decision/noise_scale" in h for h in hist)
    assert cb.samples == 48 * 4  # the samples of max_steps at the first batch, in fewer steps
    step, samples, batch = cb.history[-1]
    assert trainer.state.global_step == step + math.ceil((192 - samples) / batch) < 48
    losses = {h["step"]: h["loss"] for h in hist if "loss" in h}
    assert sorted(losses) == list(range(1, trainer.state.global_step + 1))  # a change keeps the step's record
    g = trainer.optimizer.param_groups[0]
    assert g["betas"] == pytest.approx((1 - 4 * 0.1, 1 - 4 * 0.01)) and g["final_lr"] == pytest.approx(0.1 * 2)
    # the lr schedule follows samples: the cosine ends at 0 on the last step
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    # a checkpoint between the growth decision 8 -> 16 and the step boundary that allows it
    ckpt = tmp_path / "full/out/checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["BatchScheduleCallback"]
    assert state["attributes"]["noise_state"]["steps"] == 4
    assert (state["attributes"]["global_batch"], state["attributes"]["pending"]) == (8, 16)
    resumed = _auto_trainer(tmp_path, "resumed", data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    cb2 = next(c for c in resumed.callback_handler.callbacks if isinstance(c, BatchScheduleCallback))
    assert cb2.history == cb.history and cb2.samples == cb.samples
    assert cb2.probe.estimator.estimate == cb.probe.estimator.estimate
    again = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 4}
    assert again and all(abs(again[s] - losses[s]) < 1e-6 for s in again), (again, losses)


@pytest.mark.slow
def test_auto_schedule_noise_scale_matches_a_recomputation(tmp_path):
    """The HF Trainer's loss normalisation (Llama: summed over the tokens of the whole accumulated batch) is
    undone right: one step's estimate equals |G|^2 and tr(Sigma) recomputed from the two micro batches."""
    from bigbatch.hf import BatchScheduleCallback, BigBatchTrainer
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = _args(tmp_path, optim="adabound", learning_rate=1e-3, per_device_train_batch_size=2,
                 gradient_accumulation_steps=2, max_steps=1, use_cpu=True, save_strategy="no", batch_schedule="auto",
                 max_global_batch=8, seed=0, disable_tqdm=True)
    trainer = BigBatchTrainer(model=model(), args=args, train_dataset=data)
    trainer.train()
    est = next(c for c in trainer.callback_handler.callbacks if isinstance(c, BatchScheduleCallback)).probe.estimator
    ref = model()

    def sq_norm(rows):
        ref.zero_grad()
        ref(input_ids=ids[rows], labels=ids[rows]).loss.backward()
        return sum(float(p.grad.double().square().sum()) for p in ref.parameters())

    big = sq_norm([0, 1, 2, 3])
    got = est.estimate
    assert got.steps == 1
    # the Trainer's shuffle picks the pairs: one of the three pairings must match
    smalls = [(sq_norm(a) + sq_norm(b)) / 2 for a, b in (([0, 1], [2, 3]), ([0, 2], [1, 3]), ([0, 3], [1, 2]))]
    # the two squared norms the estimate came from (|G_b|^2 = |G|^2 + tr(Sigma) / b, b = 2 and 4): |G|^2 alone
    # is a small difference of them, so they are compared, not it
    seen = (got.grad_sq + got.trace_sigma / 2, got.grad_sq + got.trace_sigma / 4)
    assert seen[1] == pytest.approx(big, rel=1e-5)
    assert any(seen[0] == pytest.approx(s, rel=1e-5) for s in smalls), (seen, smalls, big)
    assert max(abs(seen[0] - s) for s in smalls) > 1e-3 * seen[0]  # the pairings differ: the check can fail
