"""Training gated adapters: TPF rises, output stays lossless, PEFT round trip, resume, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from rids.adapter import load_adapter, save_adapter
from rids.errors import RidsError
from rids.llm import LLM
from rids.outputs import GenerationStats
from rids.tiny import build_random_adapter, repetitive_corpus
from rids.train.lora import grow_rank, new_adapter, trainable
from rids.train.trainer import TrainConfig, train_adapter
from rids_cli.main import app
from tests.conftest import hf_greedy
from tests.test_model import rids_logits

HELD_OUT = [d[:20] for d in repetitive_corpus(seed=1)[:16]]  # another seed: unseen documents


def config(base: Path, data: Path, output: Path, **kw) -> TrainConfig:
    defaults = dict(
        rank=16, max_steps=300, batch_size=8, seq_len=64, anchors=24, lr=5e-3,
        eval_every=0, save_every=100,
    )  # fmt: skip
    return TrainConfig(base=str(base), data=[data], output=output, **(defaults | kw))


def measure(base: Path, adapter: Path, prompts: list[str]):
    llm = LLM(base, adapter, branches="off", drafting="fixed")  # TPF independent of timings
    outs = llm.generate(prompts, max_new_tokens=48, stride=4)
    return GenerationStats.total([o.stats for o in outs]), [o.token_ids for o in outs], llm


def test_training_raises_tpf_and_stays_lossless(fitted, tmp_path):
    base, data = fitted
    evals = []
    trained = train_adapter(
        config(base, data, tmp_path / "a", eval_every=150), on_eval=evals.append
    )
    llm = LLM(base)
    untrained = new_adapter(
        llm.model, rank=16, alpha=16, mask_token_id=llm.tokenizer.get_vocab()["<|MASK|>"]
    )
    save_adapter(untrained, tmp_path / "untrained")
    before, _, _ = measure(base, tmp_path / "untrained", HELD_OUT)
    after, outputs, llm = measure(base, trained, HELD_OUT)
    # measured here: 1.07 untrained, 2.2 trained (acceptance .73 .88 .74)
    assert after.tpf >= before.tpf + 0.7 and after.tpf >= 1.8, (before.tpf, after.tpf)
    assert min(after.acceptance) > 0.5
    prompts = [llm.encode(p) for p in HELD_OUT]
    assert outputs == hf_greedy(base, prompts, 48)  # lossless with the trained adapter
    assert [e.step for e in evals] == [150, 300] and evals[-1].tpf > 1.0  # engine-measured eval


def test_distillation_and_data_targets_both_train(fitted, tmp_path):
    base, data = fitted
    for weight in (0.0, 1.0):
        out = train_adapter(config(base, data, tmp_path / f"w{weight}", distill_weight=weight))
        assert measure(base, out, HELD_OUT)[0].tpf >= 1.8


def test_saved_adapter_is_peft_format(fitted, tmp_path):
    base, data = fitted
    out = train_adapter(config(base, data, tmp_path / "a", max_steps=20))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, out).eval()
    ids = [5, 17, 3, 99, 3, 41, 8, 120]  # 3 is <|MASK|>: its trained row is in the adapter
    with torch.inference_mode():
        want = peft_model(torch.tensor([ids])).logits[0]
    got = rids_logits(LLM(base, out, ungated=True), ids, 4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_an_adapter_saved_by_peft_trains_on(fitted, tmp_path):
    base, data = fitted
    start = build_random_adapter(tmp_path / "peft", base, rank=4, std=0.01)
    losses, evals = [], []
    out = train_adapter(
        config(
            base, data, tmp_path / "a", max_steps=40, rank=None, init_adapter=str(start),
            eval_every=20,
        ),
        on_step=lambda r: losses.append(r.loss), on_eval=evals.append,
    )  # fmt: skip
    assert losses[-1] < losses[0]
    assert [e.step for e in evals] == [0, 20, 40]  # a warm start is evaluated where it begins
    assert LLM(base, out).adapter.rank == 4  # no --rank: the initial adapter's


def test_a_higher_rank_grows_the_initial_adapter_without_changing_it(fitted, tmp_path):
    base, data = fitted
    start = build_random_adapter(tmp_path / "peft", base, rank=4, std=0.05)
    llm = LLM(base, start, ungated=True)  # ungated: every row runs the LoRA
    ids = [5, 17, 3, 99, 3, 41, 8, 120]
    before = rids_logits(llm, ids, 4)
    grown = grow_rank(trainable(load_adapter(start, llm.model)), 8, seed=0)
    assert grown.rank == 8 and all(w.A.shape[0] == 8 for w in grown.loras.values())
    llm.set_adapter(grown)
    torch.testing.assert_close(rids_logits(llm, ids, 4), before, atol=1e-5, rtol=0)
    losses = []
    out = train_adapter(
        config(base, data, tmp_path / "a", max_steps=30, rank=8, init_adapter=str(start)),
        on_step=lambda r: losses.append(r.loss),
    )
    assert losses[-1] < losses[0]
    trained = LLM(base, out).adapter
    assert trained.rank == 8
    # the added half learned (B's new columns left zero)
    assert all(w.B[:, 4:].abs().max() > 0 for w in trained.loras.values())


def test_resume_after_a_kill_matches_an_uninterrupted_run(fitted, tmp_path):
    base, data = fitted
    kw = dict(max_steps=12, save_every=4, rank=4)
    full_losses = []
    train_adapter(
        config(base, data, tmp_path / "full", **kw), on_step=lambda r: full_losses.append(r.loss)
    )

    def killed_at_7(r):
        if r.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapter(config(base, data, tmp_path / "b", **kw), on_step=killed_at_7)
    resumed_losses = []
    train_adapter(
        config(base, data, tmp_path / "b", resume=True, **kw),
        on_step=lambda r: resumed_losses.append(r.loss),
    )
    assert resumed_losses == full_losses[7:]  # the interrupt saved step 7 before it ended the run
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no training text"),
        ("short_seq", "too short for stride"),
        ("rank0", "--rank must be >= 1"),
        ("not_writable", "is not writable"),
        ("resume_nothing", "no checkpoint"),
        ("output_is_file", "is a file"),
        ("bad_mask", "--mask-token '<nope>' is not a token"),
        ("shrink", "--rank 2 is below the initial adapter's rank 4"),
        (
            "few_weights",
            "--position-weights needs exactly one weight >= 0 per MASK position (N-1 = 3)",
        ),
        ("many_weights", "(N-1 = 3), not all 0: got [1.0, 1.0, 1.0, 1.0]"),
        ("zero_weights", "not all 0: got [0.0, 0.0, 0.0]"),
        ("text_weights", "--position-weights must be comma-separated numbers"),
        ("empty_weights", "--position-weights is empty"),
    ],
)
def test_bad_training_input_is_one_line(fitted, tmp_path, case, message):
    base, data = fitted
    args = ["train-adapter", "--base", base, "--data", data, "--output", tmp_path / "out"]
    args += ["--max-steps", "2", "--seq-len", "32"]
    if case == "empty":
        (tmp_path / "empty.txt").write_text("\n\n")
        args[4] = tmp_path / "empty.txt"
    elif case == "short_seq":
        args += ["--seq-len", "4", "--stride", "4"]
    elif case == "rank0":
        args += ["--rank", "0"]
    elif case == "not_writable":
        (tmp_path / "file").write_text("")
        args[6] = tmp_path / "file" / "out"
    elif case == "resume_nothing":
        args += ["--resume"]
    elif case == "output_is_file":
        (tmp_path / "out").write_text("")
    elif case == "bad_mask":
        args += ["--mask-token", "<nope>"]
    elif case == "shrink":
        start = build_random_adapter(tmp_path / "peft", base, rank=4, std=0.01)
        args += ["--init-adapter", start, "--rank", "2"]
    elif case.endswith("_weights"):
        weights = {"few": "2,1", "many": "1,1,1,1", "zero": "0,0,0", "text": "2,one,0", "empty": ""}
        args += ["--stride", "4", "--position-weights", weights[case.split("_")[0]]]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error:") and message in lines[-1], result.output
    assert "Traceback" not in result.output
    assert case == "output_is_file" or not (tmp_path / "out").exists()  # nothing half-made


def test_torchrun_ddp_equals_one_process_with_the_whole_batch(fitted, tmp_path):
    base, data = fitted
    common = ["--base", base, "--data", data, "--rank", "4", "--max-steps", "6", "--seq-len", "64"]
    common += ["--anchors", "8", "--lr", "5e-3", "--eval-every", "0", "--save-every", "100"]
    port = str(29600 + os.getpid() % 300)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", port, "-m", "rids_cli", "train-adapter"]  # fmt: skip
    run = subprocess.run(
        [*ddp, *map(str, common), "--batch-size", "2", "--output", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    single = CliRunner().invoke(
        app,
        [
            "train-adapter",
            *map(str, common),
            "--batch-size",
            "4",
            "--output",
            str(tmp_path / "one"),
        ],
    )
    assert single.exit_code == 0, single.output
    a = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_mask_token_option_names_the_mask(fitted, tokenizer, tmp_path):
    base, data = fitted
    out = train_adapter(config(base, data, tmp_path / "a", max_steps=2, mask_token="<|im_start|>"))
    llm = LLM(base, out)
    assert llm.mask_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert llm.mask_source == "the adapter"


def test_a_failed_evaluation_never_costs_the_run(fitted, tmp_path):
    """One long document (no blank line) against a 512-token context: the final evaluation's
    prompt (its first third) is cut to fit; and when an evaluation fails anyway, the run
    warns, keeps its adapter and exits 0."""
    base, _ = fitted
    long_doc = tmp_path / "notes.txt"
    long_doc.write_text("\n".join(repetitive_corpus(num_docs=400)))
    evals = []
    out = train_adapter(
        config(base, long_doc, tmp_path / "a", max_steps=4, eval_every=2), on_eval=evals.append
    )
    assert [e.step for e in evals] == [2, 4] and all(e.error is None for e in evals)
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert "TPF" in (out / "README.md").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("the engine broke")

    args = ["train-adapter", "--base", base, "--data", long_doc, "--output", tmp_path / "b"]
    args += ["--max-steps", "2", "--seq-len", "32", "--eval-every", "2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LLM, "generate", broken)
        result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert (
        "evaluation failed, training goes on" in result.output and "engine broke" in result.output
    )
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    assert "evaluation failed" in (tmp_path / "b" / "README.md").read_text()


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_never_runs_code_from_a_checkpoint(fitted, tmp_path):
    base, data = fitted
    out = tmp_path / "a"
    train_adapter(config(base, data, out, max_steps=2, save_every=1, rank=4))
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "optimizer": Payload(marker)}, out / "checkpoint" / "trainer_state.pt")
    with pytest.raises(RidsError, match="refusing to load it"):
        train_adapter(config(base, data, out, max_steps=4, rank=4, resume=True))
    assert not marker.exists()


def test_resume_keeps_the_checkpoint_options(fitted, tmp_path):
    base, data = fitted
    common = ["train-adapter", "--base", base, "--data", data, "--output", tmp_path / "a"]
    common += ["--seq-len", "32", "--eval-every", "0", "--max-steps", "4"]

    def run(*extra):
        return CliRunner().invoke(app, [str(a) for a in [*common, *extra]])

    def stop_at_2(r):
        if r.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a run at rank 4, interrupted after step 2
        train_adapter(
            config(base, data, tmp_path / "a", max_steps=4, rank=4, seq_len=32), on_step=stop_at_2
        )
    refused = run("--resume", "--rank", "8")
    assert refused.exit_code == 1 and "--rank 8 (checkpoint: 4)" in refused.output, refused.output
    resumed = run("--resume")  # --rank not given: the checkpoint's
    assert resumed.exit_code == 0, resumed.output
    # a log, not a terminal: a plain line for each step left (no live bar there)
    assert "step 3/4: N=4 loss" in resumed.output and "step 4/4: N=4 loss" in resumed.output
    assert LLM(base, tmp_path / "a").adapter.rank == 4


def test_an_existing_adapter_is_replaced_only_when_asked(fitted, tmp_path):
    base, data = fitted
    out = tmp_path / "a"
    train_adapter(config(base, data, out, max_steps=2, rank=4))
    (out / "README.md").write_text("a stale model card")
    with pytest.raises(RidsError, match="already holds an adapter; pass --overwrite"):
        train_adapter(config(base, data, out, max_steps=2, rank=8))
    assert LLM(base, out).adapter.rank == 4  # untouched
    train_adapter(config(base, data, out, max_steps=2, rank=8, overwrite=True))
    assert LLM(base, out).adapter.rank == 8
    assert "rank 8" in (out / "README.md").read_text()


def test_a_short_run_checkpoints_by_default(fitted, tmp_path):
    base, data = fitted
    cfg = config(base, data, tmp_path / "a", max_steps=20, rank=4, save_every=None)
    assert cfg.save_interval == 2

    def killed(r):
        if r.step == 5:
            raise SystemExit(1)  # not an interrupt the trainer sees: only saved checkpoints stay

    with pytest.raises(SystemExit):
        train_adapter(cfg, on_step=killed)
    assert torch.load(tmp_path / "a" / "checkpoint" / "trainer_state.pt")["step"] == 4
