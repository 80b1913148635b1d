"""30 common first-hour mistakes, each typed as a user would, through the command line's entry point: each ends
with one line `alpaca-rlhf: error: ...` (or the command's own one-line refusal) that names the fix, exit status
non-zero, no traceback and no usage dump. The cases run in one empty folder, in order (later ones need the tiny
SFT run the rerun case leaves)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

SFT = ["fit", "-c", "tiny/sft", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
       "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "1000"]


def data_files(folder) -> None:
    (folder / "not_json.json").write_text("{oops")
    (folder / "no_output.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    (folder / "empty_output.jsonl").write_text(json.dumps({"instruction": "a", "output": " "}) + "\n")
    (folder / "trl.jsonl").write_text(json.dumps({"prompt": "Say hi.", "completion": "Hi."}) + "\n")
    (folder / "text.jsonl").write_text(json.dumps({"text": "Once upon a time."}) + "\n")
    (folder / "empty_folder").mkdir()


# (what the user typed, what the one line must say). `None` as the first item of the args: run the rerun set-up.
MISTAKES = [
    (["fitt", "-c", "tiny/sft"], "unknown command 'fitt'"),
    (["fit"], "alpaca-rlhf fit -c tiny/sft"),
    (["fit", "-c", "tiny/sfx"], "did you mean tiny/sft"),
    (["pipeline", "-c", "configs/tiny/pipelin.yaml"], "did you mean tiny/pipeline"),
    (["fit", "-c", "tiny/sft", "--trainer.max_step", "10"], "did you mean --trainer.max_steps"),
    (["fit", "-c", "tiny/sft", "--trainer.precision", "bf17"], "'bf16-mixed'"),
    (["fit", "-c", "tiny/sft", "--model.init_args.lora.rr", "4"], "did you mean --model.init_args.lora.r"),
    (["fit", "-c", "tiny/sft", "--data.init_args.cutof_len", "64"], "did you mean --data.init_args.cutoff_len"),
    (["fit", "-c", "tiny/sft", "--model.init_args.model.name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruc"],
     "builds a random tiny LLaMA only at a local folder"),
    ([*SFT, "--data.init_args.data_path", "gone.jsonl"], "data file 'gone.jsonl' not found"),
    ([*SFT, "--data.init_args.data_path", "../no/such/dir"], "data folder '../no/such/dir' not found"),
    ([*SFT, "--data.init_args.data_path", "not_json.json"], "not_json.json: not JSON"),
    ([*SFT, "--data.init_args.data_path", "no_output.json"], "record 1: field 'output' is missing"),
    ([*SFT, "--data.init_args.data_path", "empty_output.jsonl"], "record 0: field 'output' is empty"),
    ([*SFT, "--data.init_args.data_path", "empty_folder"], "is a folder with no data file"),
    ([*SFT, "--data.init_args.data_path", "trl.jsonl"], "fields: {instruction: prompt, output: completion}"),
    ([*SFT, "--data.init_args.data_path", "text.jsonl"], "plain {text} record"),
    (["fit", "-c", "tiny/ppo"], "run that first"),
    (["preflight", "-c", "smol/rm"], "--model_shape"),
    ([None, *SFT], "--ckpt_path last, or start over with --overwrite"),
    (["merge", "--adapter_path", "output/tiny/lora-alpaca"], "--overwrite"),
    (["merge", "--adapter_path", "output/tiny/lora-alpac"], "no adapter_config.json"),
    (["generate", "--instruction", "Hi"], "give --model PATH"),
    (["generate", "--model", "output/tiny/lora-alpaca", "--instruction", "Hi", "--max_new_token", "5"],
     "did you mean --max_new_tokens?"),
    (["generate", "--mode", "foo", "--instruction", "Hi"], "choose one of 'base', 'sft', 'rlhf', 'ppo'"),
    (["generate", "--model", "output/tiny/lora-alpaca"], "give exactly one of --instruction"),
    (["pipeline", "-c", "tiny/pipeline", "--from_stage", "nope"], "--from_stage must be one of"),
    (["compare"], "nothing to compare"),
    (["fit", "-c", "tiny/ppo", "--model.init_args.ppo.ppo_epoch", "2"],  # was taken as ppo_epochs, silently
     "abbreviations are refused); did you mean --model.init_args.ppo.ppo_epochs?"),
    (["data", "-c", "tiny/sft", "--show", "three"], "--show takes a number"),
]


def test_twenty_five_common_mistakes_end_in_one_line_that_says_the_fix(tmp_path, monkeypatch, capsys):
    from alpaca_rlhf.cli import main

    assert len(MISTAKES) >= 25
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALPACA_RLHF_DEBUG", raising=False)
    data_files(tmp_path)
    failures = []
    for args, says in MISTAKES:
        if args[0] is None:  # a finished run, then the same command again
            args = args[1:]
            main(args)
            main(["merge", "--adapter_path", "output/tiny/lora-alpaca"])
        capsys.readouterr()
        try:
            main(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        if isinstance(code, str):  # SystemExit("message"): the interpreter prints it on stderr
            err, code = err + code, 1
        ours = [line for line in err.splitlines() if line.startswith(("alpaca-rlhf:", "pipeline:"))]
        problems = []
        if code in (0, None):
            problems.append("exit status 0")
        if len(ours) != 1 or says not in ours[0]:
            problems.append(f"one line saying {says!r}: {ours}")
        if "Traceback" in err or "usage:" in err:
            problems.append("a traceback or usage dump")
        if problems:
            failures.append(f"{' '.join(args)}: {'; '.join(problems)}\n{err[-1500:]}")
    assert not failures, "\n\n".join(failures)
