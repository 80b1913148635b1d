"""generate and compare on tiny checkpoints built in seconds (random LoRA weights, no training or network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from alpaca_rlhf import inference as inf
from alpaca_rlhf.data.templates import PromptTemplate

INSTRUCTIONS = [
    {"instruction": "Give three tips for staying healthy.", "input": ""},
    {"instruction": "Translate the sentence into French.", "input": "The cat sleeps on a warm window sill."},
    {"instruction": "Name a color.", "input": ""},
]


def _adapter(base: Path, out: Path, scale: float, seed: int, extra: dict | None = None) -> Path:
    """A LoRA adapter on `base` with random B (scale 0 = the identity adapter), exported as a stage would."""
    from alpaca_rlhf.models import (
        LoraSpec,
        ModelSpec,
        apply_lora,
        export_adapter,
        load_causal_lm,
        load_tokenizer,
    )

    spec = ModelSpec(name_or_path=str(base))
    with torch.random.fork_rng(devices=[]):  # lora_A's init too: the same adapters whatever ran before
        torch.manual_seed(seed)
        model = apply_lora(load_causal_lm(spec), LoraSpec(r=4, alpha=8, dropout=0.0))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(std=scale) if scale else p.data.zero_()
    return export_adapter(model, load_tokenizer(spec), out,
                          {"template.json": PromptTemplate.load().to_json(), **(extra or {})})


@pytest.fixture(scope="module")
def tiny_stages(tiny_base, tmp_path_factory):
    """A work folder laid out as the tiny chain leaves it: base, SFT adapter + merged, PPO step export, RM."""
    from alpaca_rlhf.models import ModelSpec, load_sequence_classifier, load_tokenizer, merge_adapter

    work = tmp_path_factory.mktemp("stages")
    out = work / "output"
    sft = _adapter(tiny_base, out / "lora-alpaca", scale=0.5, seed=1)
    merged = merge_adapter(str(sft))
    # PPO records its base relative to the run's working directory, as the real export does
    _adapter(merged, out / "ppo" / "step_3", scale=0.5, seed=2,
             extra={"ppo_state.json": {"iteration": 3, "kl_coef": 0.05,
                                       "base_model": "output/lora-alpaca-adapter-merged"}})
    _adapter(merged, out / "ppo_identity" / "step_1", scale=0.0, seed=3,
             extra={"ppo_state.json": {"iteration": 1, "base_model": "output/lora-alpaca-adapter-merged"}})
    _adapter(merged, out / "dpo", scale=0.0, seed=4)  # an RL adapter without ppo_state.json, as DPO exports it
    spec = ModelSpec(name_or_path=str(merged))
    tokenizer = load_tokenizer(spec)
    rm = load_sequence_classifier(spec, pad_token_id=tokenizer.pad_token_id, trainable=False)
    rm.save_pretrained(out / "rm-merged")
    tokenizer.save_pretrained(out / "rm-merged")
    (out / "rm-merged" / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0, "n": 10}))
    return {"work": work, "base": str(tiny_base), "adapter": str(sft), "merged": str(merged),
            "ppo": str(out / "ppo" / "step_3"), "ppo_dir": str(out / "ppo"),
            "identity": str(out / "ppo_identity"), "rm": str(out / "rm-merged"), "dpo": str(out / "dpo")}


GREEDY = dict(temperature=0.0, max_new_tokens=8, stream=False)


def test_resolve_checkpoint_maps_the_seed_flags(tiny_stages, monkeypatch, tmp_path):
    s = tiny_stages
    assert inf.resolve_checkpoint("base", model_name=s["base"]).adapter is None
    adapter = inf.resolve_checkpoint("sft", adapter_path=s["adapter"])
    assert adapter.base == s["base"] and adapter.tokenizer == s["adapter"]
    assert adapter.template.endswith("template.json")
    assert inf.resolve_checkpoint("sft", merged_model_path=s["merged"]).base == s["merged"]
    monkeypatch.chdir(tmp_path)  # not the PPO run's working directory: the relative base is found anyway
    ppo = inf.resolve_checkpoint("ppo", ppo_model_path=s["ppo"])
    assert Path(ppo.base).resolve() == Path(s["merged"]).resolve() and ppo.adapter == s["ppo"]
    assert ppo.ppo_state["iteration"] == 3
    assert inf.resolve_checkpoint("ppo", ppo_model_path=s["ppo_dir"]).adapter == s["ppo"]  # latest step_<n>
    for mode, kwargs, message in [("base", {}, "--model_name"), ("sft", {}, "--merged_model_path"),
                                  ("ppo", {}, "--rlhf_model"), ("rlhf", {}, "--rlhf_model"),
                                  ("dpo", {}, "--mode must be")]:
        with pytest.raises(ValueError, match=message):
            inf.resolve_checkpoint(mode, **kwargs)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        inf.resolve_checkpoint("sft", adapter_path=str(tmp_path))


def test_generate_in_each_mode(tiny_stages, capsys):
    s, q = tiny_stages, INSTRUCTIONS[0]["instruction"]
    base = inf.generate(mode="base", model_name=s["base"], instruction=q, **GREEDY)[0]["response"]
    on_base = inf.generate(mode="sft", adapter_path=s["adapter"], instruction=q, **GREEDY)[0]["response"]
    merged = inf.generate(mode="sft", merged_model_path=s["merged"], instruction=q, **GREEDY)[0]["response"]
    ppo = inf.generate(mode="ppo", ppo_model_path=s["ppo"], instruction=q, input="some context", **GREEDY)
    merged_with_input = inf.generate(mode="sft", merged_model_path=s["merged"], instruction=q, input="some context",
                                     **GREEDY)[0]["response"]
    assert on_base == merged  # the merged model is the adapter folded in
    assert base != merged and ppo[0]["input"] == "some context"
    assert ppo[0]["response"] != merged_with_input  # the PPO adapter on top changes the answer to the same prompt
    printed = capsys.readouterr().out
    assert merged in printed and "### Response" not in printed  # only the response part is printed


def test_batched_generation_equals_one_by_one_and_writes_jsonl(tiny_stages, tmp_path):
    file = tmp_path / "instructions.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in INSTRUCTIONS))
    batched = inf.generate(mode="sft", merged_model_path=tiny_stages["merged"], instructions_file=str(file),
                           output_file=str(tmp_path / "out.jsonl"), batch_size=3, **GREEDY)
    single = [inf.generate(mode="sft", merged_model_path=tiny_stages["merged"], **r, **GREEDY)[0]
              for r in INSTRUCTIONS]
    assert [b["response"] for b in batched] == [x["response"] for x in single]  # left padding leaks nothing
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [w["instruction"] for w in written] == [r["instruction"] for r in INSTRUCTIONS]


def test_single_instruction_streams(tiny_stages, capsys):
    out = inf.generate(mode="sft", merged_model_path=tiny_stages["merged"], instruction="Name a color.",
                       temperature=0.0, max_new_tokens=8, stream=True)
    assert capsys.readouterr().out.strip() == out[0]["response"]


def test_generate_renders_conversations_and_hh_records_and_writes_every_answer(tiny_stages, tmp_path, capsys):
    """`{messages}` and HH records once rendered as "### Instruction:\nNone" and, with several records, crashed
    after generating and wrote nothing."""
    records = [{"messages": [{"role": "user", "content": "Name a colour."}]},
               {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Name a fruit."}]},
               {"chosen": "\n\nHuman: Name a planet.\n\nAssistant: Mars.",
                "rejected": "\n\nHuman: Name a planet.\n\nAssistant: Cheese."}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = inf.generate(model=tiny_stages["merged"], instructions_file=str(path),
                       output_file=str(tmp_path / "answers.jsonl"), **GREEDY)
    assert [r["instruction"] for r in out] == ["Name a colour.", "Name a fruit.", "Name a planet."]
    assert "Hello!" in out[1]["input"]  # the earlier turns are the context
    written = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [w["instruction"] for w in written] == [r["instruction"] for r in out]
    printed = capsys.readouterr().out
    assert "None" not in printed and "### 3. Name a planet." in printed


def test_8bit_on_cpu_and_offload_without_gpu(tiny_stages, capsys):
    out = inf.generate(mode="sft", merged_model_path=tiny_stages["merged"], instruction="Name a color.",
                       load_in_8bit=True, allow_cpu_offload=True, **GREEDY)
    assert isinstance(out[0]["response"], str)
    if not torch.cuda.is_available():
        assert "no CUDA device here, so nothing is offloaded" in capsys.readouterr().err


def test_generate_through_the_cli(tiny_stages, capsys):
    from cli import cli_main

    cli_main(["generate", "--mode", "ppo", "--ppo_model_path", tiny_stages["ppo"], "--instruction",
              "Name a color.", "--temperature", "0", "--max_new_tokens", "6", "--allow_cpu_offload"])
    captured = capsys.readouterr()
    assert captured.out.strip()
    if not torch.cuda.is_available():  # a bare boolean flag is accepted
        assert "nothing is offloaded" in captured.err
    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--mode", "--model_name", "--adapter_path", "--merged_model_path", "--ppo_model_path",
                 "--tokenizer_name", "--instruction", "--input", "--max_new_tokens", "--temperature",
                 "--top_p", "--top_k", "--load_in_8bit", "--allow_cpu_offload"):
        assert flag in help_text


def test_one_path_is_enough_the_kind_of_checkpoint_is_detected(tiny_stages, tmp_path):
    s = tiny_stages
    for path, kind, adapter in [(s["ppo"], "rlhf", s["ppo"]), (s["ppo_dir"], "rlhf", s["ppo"]),
                                (s["adapter"], "adapter", s["adapter"]), (s["merged"], "model", None),
                                (s["base"], "model", None)]:
        checkpoint, found = inf.detect_checkpoint(path)
        assert (found, checkpoint.adapter) == (kind, adapter), path
    with pytest.raises(ValueError, match="reward model"):
        inf.detect_checkpoint(s["rm"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        inf.detect_checkpoint(str(tmp_path))
    # --model gives what the stage flags give; compare's flag names work in generate too
    by_model = inf.generate(model=s["ppo_dir"], instruction="Name a color.", **GREEDY)
    by_flags = inf.generate(rlhf_model=s["ppo"], instruction="Name a color.", **GREEDY)
    by_seed_flags = inf.generate(mode="ppo", ppo_model_path=s["ppo"], instruction="Name a color.", **GREEDY)
    assert by_model == by_flags == by_seed_flags
    assert inf.generate(sft_model=s["adapter"], instruction="Hi.", **GREEDY) == \
        inf.generate(mode="sft", adapter_path=s["adapter"], instruction="Hi.", **GREEDY)
    with pytest.raises(ValueError, match="--model detects the stage itself"):
        inf.generate(model=s["merged"], mode="sft", instruction="Hi.")


def test_chat_keeps_the_conversation_and_streams_each_answer(tiny_stages, monkeypatch, capsys):
    import io

    turns = io.StringIO("Name a color.\nAnd another one?\n/reset\nHi.\n/exit\n")
    monkeypatch.setattr("sys.stdin", turns)
    messages = inf.generate(model=tiny_stages["merged"], chat=True, temperature=0.0, max_new_tokens=5)
    assert [m["role"] for m in messages] == ["user", "assistant"]  # /reset forgot the first two turns
    assert messages[0]["content"] == "Hi."
    out = capsys.readouterr().out
    assert out.count(">>> ") == 5 and "(conversation forgotten)" in out
    assert messages[1]["content"] in out  # streamed as it was generated


def test_every_command_has_config_and_print_config_and_help_lists_them(capsys):
    from alpaca_rlhf.cli import COMMANDS, cli_main, root_help

    cli_main(["--help"])
    listed = capsys.readouterr().out
    assert all(f"  {c} " in listed for c in COMMANDS) and "test" not in COMMANDS
    for command in ("merge", "generate", "compare", "pipeline", "init"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = capsys.readouterr().out
        assert "-c CONFIG, --config CONFIG" in text and "--print_config" in text, command
    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])
    assert "Literal['base', 'sft', 'rlhf', 'ppo']" in capsys.readouterr().out  # choices shown
    with pytest.raises(SystemExit) as unknown:
        cli_main(["test", "--config", "x.yaml"])
    assert "unknown command 'test'" in str(unknown.value.code)
    with pytest.raises(SystemExit):
        cli_main(["merge", "--adapter_path", "a", "--print_config"])
    assert "adapter_path: a" in capsys.readouterr().out
    assert "alpaca-rlhf init" in root_help()


def test_version_and_env_print_what_a_bug_report_needs(capsys):
    from importlib.metadata import version

    from alpaca_rlhf.cli import cli_main

    cli_main(["--version"])
    assert capsys.readouterr().out.strip() == f"alpaca-rlhf {version('alpaca-rlhf')}"
    cli_main(["env"])
    out = capsys.readouterr().out
    for name in ("torch", "lightning", "transformers", "peft", "bitsandbytes", "native bf16:", "cuda",
                 "precision auto ->"):
        assert name in out, name
    assert f"torch {version('torch')}" in out


def test_response_logprob_sums_ignore_padding(tiny_stages):
    from alpaca_rlhf.models import ModelSpec, load_causal_lm

    model = load_causal_lm(ModelSpec(name_or_path=tiny_stages["merged"]), trainable=False)
    prompts, responses = [[1, 5, 6, 7], [1, 9]], [[10, 11, 2], [12]]
    together = inf.response_logprob_sums(model, prompts, responses, pad_token_id=3, batch_size=2)
    alone = torch.cat([inf.response_logprob_sums(model, [p], [r], pad_token_id=3)
                       for p, r in zip(prompts, responses, strict=True)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    logits = model(torch.tensor([prompts[1] + responses[1]])).logits[0]
    expected = torch.log_softmax(logits[1], -1)[12]  # token 12 at position 2 is predicted at position 1
    torch.testing.assert_close(alone[1], expected, atol=1e-5, rtol=1e-5)


def test_compare_writes_a_report_with_all_three_stages_and_scores(tiny_stages, tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    s = tiny_stages
    run = tmp_path / "ppo_run"  # a PPO run's TensorBoard events, as PPOModule logs them
    with SummaryWriter(str(run)) as writer:
        for it in range(5):
            for tag in ("rollout/score", "rollout/kl", "ppo/kl_coef", "rollout/response_length"):
                writer.add_scalar(tag, it * 0.1, it)
    summary = inf.compare(base_model=s["base"], sft_model=s["merged"], rlhf_model=s["ppo_dir"],
                          reward_model=s["rm"],
                          prompts=inf.PromptSource(val_set_size=4, max_prompt_length=128),
                          sampling=inf.SamplingSpec(max_new_tokens=6, temperature=1.0), samples_per_prompt=2,
                          report_dir=str(tmp_path / "cmp"), width=120, ppo_log_dir=str(run))
    plots = ["score_distribution.png", "score_vs_length.png", "ppo_curves.png"]
    for name in plots:
        assert (tmp_path / "cmp" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in (tmp_path / "cmp/report.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "cmp/outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 * 3 and {r["stage"] for r in rows} == {"base", "sft", "rlhf"}
    assert all(isinstance(r["score"], float) for r in rows)
    assert all(isinstance(r["kl_to_sft"], float) for r in rows if r["stage"] == "rlhf")
    for stage in ("base", "sft", "rlhf"):
        mine = [r["score"] for r in rows if r["stage"] == stage]
        assert summary["stages"][stage]["score_mean"] == pytest.approx(sum(mine) / len(mine))
    assert 0.0 <= summary["rlhf_vs_sft"]["win_rate"] <= 1.0 and "kl_rlhf_to_sft" in summary
    assert set(summary["reward_anchors"]) == {"empty response", "dataset answer"}
    report = (tmp_path / "cmp/report.md").read_text()
    for text in ("| base |", "| SFT |", "| RLHF |", "Win rate of RLHF over SFT", "KL(RLHF", s["rm"], "step_3",
                 "temperature 1.0", "PPO iteration 3", "Reward-model anchors"):
        assert text in report
    assert json.loads((tmp_path / "cmp/summary.json").read_text())["settings"]["samples_per_prompt"] == 2
    printed = capsys.readouterr().out
    assert "RLHF (score" in printed and "win rate RLHF over SFT" in printed
    assert "win rate RLHF over SFT by the optimised RM" in printed and "[95% CI" in printed  # an interval, always
    assert "[95% CI" in report.split("Win rate of RLHF over SFT")[1].split("\n")[0]


def test_compare_with_an_llm_judge_validates_it_and_gives_every_win_rate_an_interval(tiny_stages, tmp_path, capsys):
    """The judge (here the tiny base: real code, random weights) is validated on held-out human-labelled HH pairs
    before its RLHF-vs-SFT verdict; every win rate carries a paired-bootstrap interval; the report shows examples
    drawn with the seed, each with the judge's verdict."""
    hh = ROOT.parent / "shared/data/hh-rlhf-harmless/test.jsonl.gz"
    if not hh.is_file():
        pytest.skip(f"real-data test: {hh} is absent")
    s = tiny_stages
    summary = inf.compare(sft_model=s["merged"], rlhf_model=s["ppo_dir"], reward_model=s["rm"],
                          prompts=inf.PromptSource(data_path=[str(hh)], part="eval", max_prompts=6,
                                                   max_prompt_length=128, skip_bad_records=True, max_records=400),
                          sampling=inf.SamplingSpec(max_new_tokens=6, temperature=1.0),
                          report_dir=str(tmp_path / "cmp"), width=120, llm_judge=s["base"], llm_judge_pairs=6,
                          examples=3)
    llm = summary["llm_judge"]
    assert llm["validation"]["n"] == 6 and llm["rlhf_vs_sft"]["n"] == 6 and len(llm["outcomes"]) == 6
    result = llm["rlhf_vs_sft"]
    assert result["win"] + result["tie"] + result["loss"] == 6
    assert result["ci95"][0] <= result["win_rate"] <= result["ci95"][1]
    assert isinstance(llm["reliable"], bool) and 0.0 <= llm["agreement"] <= 1.0
    lo, hi = summary["rlhf_vs_sft"]["win_rate_ci95"]
    assert lo <= summary["rlhf_vs_sft"]["win_rate"] <= hi
    assert len(summary["examples"]) == 3 and summary["examples"] == sorted(set(summary["examples"]))
    report = (tmp_path / "cmp/report.md").read_text()
    for text in ("The LLM judge (shares no labels", "agreement with the human labels of 6 held-out pairs",
                 "RLHF vs SFT:", "3 examples drawn with the seed", "LLM judge: *", "[95% CI"):
        assert text in report, text
    rows = [json.loads(line) for line in (tmp_path / "cmp/outputs.jsonl").read_text().splitlines()]
    assert {r["llm_judge_rlhf_vs_sft"] for r in rows if r["stage"] == "rlhf"} <= {0.0, 0.5, 1.0}
    assert "agreement with the human labels" in capsys.readouterr().out


def test_a_merged_rl_export_is_a_model_that_generate_and_compare_take(tiny_stages, tmp_path, monkeypatch):
    """Merging a PPO `step_<n>` once copied its ppo_state.json, so the merged folder read as a PPO run and was
    refused; its state now travels as merged_from.json."""
    from alpaca_rlhf.inference.checkpoints import detect_checkpoint
    from alpaca_rlhf.models import merge_adapter

    s = tiny_stages
    monkeypatch.chdir(s["work"])  # the export records its base relative to the run's folder
    merged = merge_adapter(s["ppo"], str(tmp_path / "ppo-merged"))
    assert not (merged / "ppo_state.json").exists()
    provenance = json.loads((merged / "merged_from.json").read_text())
    assert provenance["ppo_state.json"]["iteration"] == 3 and provenance["adapter"] == s["ppo"]
    checkpoint, kind = detect_checkpoint(str(merged))
    assert kind == "model" and checkpoint.adapter is None
    # one servable folder: plain transformers loads the policy and its tokenizer, nothing of PPO's own comes along
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    assert not any("value" in k or "lora" in k for k in model.state_dict())
    assert model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=2).shape[1] >= 2
    summary = inf.compare(sft_model=s["merged"], rlhf_model=str(merged), prompts=inf.PromptSource(val_set_size=2),
                          sampling=inf.SamplingSpec(max_new_tokens=4), report_dir=str(tmp_path / "cmp"))
    assert set(summary["stages"]) == {"sft", "rlhf"}


def test_compare_identity_adapter_has_zero_kl_and_ties(tiny_stages, tmp_path):
    """An RLHF adapter with B = 0 is the SFT model: same samples (same seed), KL exactly 0, prompts tie."""
    s = tiny_stages
    summary = inf.compare(sft_model=s["merged"], rlhf_model=s["identity"], reward_model=s["rm"],
                          prompts=inf.PromptSource(val_set_size=3, max_prompt_length=128),
                          sampling=inf.SamplingSpec(max_new_tokens=5, temperature=1.0),
                          report_dir=str(tmp_path))
    assert summary["kl_rlhf_to_sft"]["mean"] == 0.0
    assert summary["rlhf_vs_sft"]["win_rate"] == 0.5
    assert "base" not in summary["stages"]
    # a DPO adapter (no ppo_state.json) as the RLHF stage: found from its folder, the same identity result
    dpo = inf.compare(sft_model=s["merged"], rlhf_model=s["dpo"], reward_model=s["rm"],
                      prompts=inf.PromptSource(val_set_size=3, max_prompt_length=128),
                      sampling=inf.SamplingSpec(max_new_tokens=5, temperature=1.0), report_dir=str(tmp_path / "d"))
    assert dpo["kl_rlhf_to_sft"]["mean"] == 0.0 and dpo["rlhf_vs_sft"]["win_rate"] == 0.5
    with pytest.raises(FileNotFoundError, match="run the RL stage"):
        inf.compare(sft_model=s["merged"], rlhf_model=str(tmp_path / "nope"))


def test_held_out_prompts_are_ppo_validation_prompts(tiny_tokenizer):
    from alpaca_rlhf.data import PromptDataModule

    source = inf.PromptSource(val_set_size=16, seed=7, max_prompt_length=80)
    dm = PromptDataModule(data_path=source.data_path, max_prompt_length=80, val_set_size=16, batch_size=4,
                          seed=7)
    dm.connect(tiny_tokenizer)
    dm.setup("fit")
    held_out = inf.held_out_records(source, tiny_tokenizer, PromptTemplate.load())
    assert [r["prompt"] for r in held_out] == [e["prompt"] for e in dm.val_data]
    assert all(r["instruction"] in r["prompt"] for r in held_out)


def test_held_out_prompts_follow_ppos_max_records_and_skip_bad_records(tiny_tokenizer, tmp_path):
    """With PPO's max_records: 200, 20 of compare's 64 "held-out" prompts used to be PPO training prompts; with
    skip_bad_records compare failed on the bad record."""
    from alpaca_rlhf.data import PromptDataModule

    records = json.loads((ROOT / "alpaca_rlhf/data/samples/alpaca_sample.json").read_text())
    records.insert(5, {"instruction": "", "input": "", "output": "x"})  # a bad record
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(records))
    split = dict(max_prompt_length=128, val_set_size=64, seed=42, skip_bad_records=True, max_records=200)
    dm = PromptDataModule(data_path=str(path), batch_size=4, **split)
    dm.connect(tiny_tokenizer)
    dm.setup("fit")
    held_out = inf.held_out_records(inf.PromptSource(str(path), **split), tiny_tokenizer, PromptTemplate.load())
    assert [r["prompt"] for r in held_out] == [e["prompt"] for e in dm.val_data]
    assert not {r["prompt"] for r in held_out} & {e["prompt"] for e in dm.train_data}


def test_win_rate_and_template_following():
    assert inf.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    t = PromptTemplate.load()
    assert inf.follows_template("Eat well.", True, t)
    assert not inf.follows_template("Eat well.", False, t)  # ran out of tokens
    assert not inf.follows_template("Eat well.\n\n### Instruction:\nmore", True, t)  # started a new section
    assert not inf.follows_template("", True, t)


def test_reward_hacking_diagnostics_flag_a_gamed_reward_model():
    def stage(tokens, score, judge, texts, ended=True):
        return [{"stage": name, "prompt_id": i, "sample": 0, "response": t, "response_tokens": tokens, "score": score,
                 "ended_with_eos": ended, "follows_template": ended} for i, t in enumerate(texts)
                for name in [stage.name]]

    texts = ["The sky is blue because of scattering.", "Drink water and sleep well.", "Paris is in France."]
    stage.name = "sft"
    sft = stage(8, 0.0, 0.0, texts)
    stage.name = "rlhf"
    rlhf = stage(40, 2.0, -1.0, ["great great great great"] * 3, ended=False)
    rlhf[0]["response_tokens"], rlhf[0]["score"] = 44, 2.5  # longer, higher: score tracks length
    scores = {"sft": [r["score"] for r in sft], "rlhf": [r["score"] for r in rlhf]}
    judge = {"sft": [0.0] * 3, "rlhf": [-1.0] * 3}
    summary = inf.summarize(["sft", "rlhf"], sft + rlhf, scores, None, 1, inf.SamplingSpec(max_new_tokens=40), judge)
    flags = " ".join(summary["reward_hacking"])
    for sign in ("judge's fell", "length", "distinct-2", "length limit"):
        assert sign in flags, sign
    assert summary["stages"]["rlhf"]["repeated_3gram"] == 1.0 and summary["stages"]["sft"]["repeated_3gram"] == 0.0
    assert summary["rlhf_vs_sft"]["judge_win_rate"] == 0.0
    clean = inf.summarize(["sft", "rlhf"], sft + [{**r, "stage": "rlhf"} for r in sft],
                          {"sft": scores["sft"], "rlhf": scores["sft"]}, None, 1, inf.SamplingSpec(), judge)
    assert clean["reward_hacking"] == []


def test_a_reward_model_that_prefers_brevity_is_flagged_when_rlhf_shrinks_its_answers():
    """The smol run: SFT ~39 tokens, RLHF ~13, and the RM's score falls with length on SFT's own responses."""
    def rows(name, lengths, scores):
        return [{"stage": name, "prompt_id": i, "sample": 0, "response": f"answer number {i} here",
                 "response_tokens": n, "score": sc, "ended_with_eos": True, "follows_template": True}
                for i, (n, sc) in enumerate(zip(lengths, scores, strict=True))]

    sft = rows("sft", [20, 30, 40, 48], [0.6, 0.3, 0.0, -0.3])  # longer, lower
    rlhf = rows("rlhf", [8, 10, 12, 14], [0.7, 0.7, 0.6, 0.7])
    scores = {"sft": [r["score"] for r in sft], "rlhf": [r["score"] for r in rlhf]}
    summary = inf.summarize(["sft", "rlhf"], sft + rlhf, scores, None, 1, inf.SamplingSpec(max_new_tokens=48))
    flags = " ".join(summary["reward_hacking"])
    assert "buying reward with brevity" in flags and "on SFT's responses" in flags, flags


def test_shipped_compare_configs_parse(capsys):
    from cli import cli_main

    for config in ("configs/tiny/compare.yaml", "configs/compare.yaml", "configs/smol/compare.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["compare", "--config", str(ROOT / config), "--print_config"])
        assert exit_info.value.code in (0, None)
        assert "report_dir" in capsys.readouterr().out


def test_plots_give_each_stage_its_panel_mark_the_length_cap_and_show_kl_coef_from_zero(tmp_path):
    """Issue 24 item 7: RLHF's points hid the base stage's in one scatter, the length cap was unmarked, and a KL
    coefficient going 0.1000 -> 0.1006 filled the whole panel (it looked like a steep change)."""
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    from alpaca_rlhf.inference import plots

    plt = plots._pyplot()
    rows = [{"stage": stage, "response_tokens": n, "score": 0.1 * n} for stage in ("base", "sft", "rlhf")
            for n in (3, 6, 6)]  # base and RLHF at the very same points
    fig = plots.score_vs_length_figure(plt, rows, ["base", "sft", "rlhf"], length_cap=6)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["base (n=3)", "SFT (n=3)", "RLHF (n=3)"]
    for ax in axes:
        assert len(ax.collections[0].get_offsets()) == 3  # every stage's own points, in its own panel
        assert any(list(line.get_xdata()) == [6, 6] for line in ax.lines)  # the cap, marked
    plt.close(fig)
    run = tmp_path / "run"
    with SummaryWriter(str(run)) as writer:
        for it in range(6):
            writer.add_scalar("ppo/kl_coef", 0.1 + 0.0001 * it, it)
            writer.add_scalar("rollout/score", 0.1 * it, it)
    fig = plots.ppo_curves_figure(plt, run)
    kl_panel = next(ax for ax in fig.axes if ax.get_title() == "KL coefficient")
    low, high = kl_panel.get_ylim()
    assert low == 0 and high >= 0.1005
    plt.close(fig)
    assert plots.score_vs_length(rows, ["base", "sft", "rlhf"], tmp_path / "s.png", 6).is_file()


def test_push_to_a_local_folder_gives_loadable_folders_with_a_model_card(tiny_stages, tmp_path, monkeypatch, capsys):
    """`alpaca-rlhf push` to a path writes what the hub would get: the files whole, and a model card in place of
    PEFT's blank template; the copies load with PEFT / plain transformers. No network."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alpaca_rlhf.cli import main

    s = tiny_stages
    monkeypatch.chdir(s["work"])
    main(["push", "--folder", s["adapter"], "--to", str(tmp_path / "sft")])
    card = (tmp_path / "sft/README.md").read_text()
    assert "library_name: peft" in card and "sft]" in card and "Model Card for Model ID" not in card
    base = AutoModelForCausalLM.from_pretrained(s["base"])
    PeftModel.from_pretrained(base, str(tmp_path / "sft"))  # PEFT's own format, loadable from the copy
    main(["push", "--folder", s["merged"], "--to", f"file://{tmp_path / 'merged'}"])
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    main(["push", "--folder", s["rm"], "--to", str(tmp_path / "rm")])
    assert "reward-model" in (tmp_path / "rm/README.md").read_text()
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    capsys.readouterr()
    for folder, to, says in ((s["adapter"], tmp_path / "sft", "--overwrite true"),
                             (s["work"], tmp_path / "x", "has no weights")):
        with pytest.raises(SystemExit):
            main(["push", "--folder", str(folder), "--to", str(to)])
        assert says in capsys.readouterr().err
