"""`alpaca-rlhf data`: what a stage's DataModule will feed the model, before any training.

    alpaca-rlhf data -c tiny/sft --show 3          # rendered prompts, the labelled tokens, the counts
    alpaca-rlhf data -c smol/rm --show 2           # preference pairs: prompt, chosen, rejected
    alpaca-rlhf data -c smol/ppo --data.init_args.max_prompt_length 128   # any fit override

The config is resolved by `fit`'s own parser and the DataModule is the one `fit` would build, given the stage
model's tokenizer (its weights are not loaded). For each shown example it prints the text the model sees with
the part that carries no loss in brackets (`[prompt] response`), the token counts, and whether it was cut.
"""

from __future__ import annotations

from alpaca_rlhf.errors import ConfigError

USAGE = ("usage: alpaca-rlhf data -c CONFIG [--show N] [--split train|val] [fit overrides]\n\n"
         "Prints what a stage's DataModule feeds the model: the counts (records read, dropped, cut, train/val), "
         "then N examples as the model sees them, the unlabelled prompt in [brackets].")
IGNORE_INDEX = -100


def _take_flag(args: list[str], flag: str, default: str) -> tuple[list[str], str]:
    if flag not in args:
        return args, default
    i = args.index(flag)
    if i + 1 >= len(args):
        raise ConfigError(f"alpaca-rlhf data: {flag} needs a value")
    return args[:i] + args[i + 2:], args[i + 1]


def build_datamodule(config):
    """The DataModule `fit` would build from a resolved fit config, and the stage model's tokenizer bound to it."""
    import lightning as L
    from jsonargparse import ArgumentParser

    from alpaca_rlhf.data.records import check_data_path
    from alpaca_rlhf.models import ModelSpec, load_tokenizer
    from alpaca_rlhf.parsers import one_template

    one_template(config)  # as fit does: the data renders with the model's template
    data = config.get("data")
    if not data or not data.get("class_path"):
        raise ConfigError("alpaca-rlhf data: the config has no data: block (give the stage's config with -c)")
    check_data_path(data.get("init_args", {}).get("data_path"))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    datamodule = parser.instantiate_classes(parser.parse_object({"data": data.as_dict()})).data
    model_args = config["model"]["init_args"]
    spec = model_args.get("model") or model_args.get("policy")  # policy: an online stage's old name
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(**spec.as_dict())
    online = model_args.get("scorer") is not None  # prompts are left-padded for generation
    datamodule.connect(load_tokenizer(spec, padding_side="left" if online else "right"))
    return datamodule


def _labelled_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The sequence with the positions that carry no loss in [brackets]."""
    out, run, run_labelled = [], [], None
    for token, label in zip(ids, labels, strict=True):
        labelled = label != IGNORE_INDEX
        if run and labelled != run_labelled:
            text = tokenizer.decode(run)
            out.append(text if run_labelled else f"[{text}]")
            run = []
        run.append(token)
        run_labelled = labelled
    if run:
        text = tokenizer.decode(run)
        out.append(text if run_labelled else f"[{text}]")
    return "".join(out)


def describe(tokenizer, example: dict) -> list[str]:
    """Lines for one example of any stage: SFT (input_ids + labels), a preference pair, or an RL prompt."""
    if "labels" in example:
        labelled = sum(1 for label in example["labels"] if label != IGNORE_INDEX)
        return [f"{len(example['input_ids'])} tokens, {labelled} labelled"
                + (" (cut at cutoff_len)" if example.get("truncated") else ""),
                _labelled_text(tokenizer, example["input_ids"], example["labels"])]
    if "chosen_input_ids" in example:
        n = example["prompt_length"]
        prompt = tokenizer.decode(example["chosen_input_ids"][:n])
        return [f"prompt {n} tokens" + (" (cut from the left to fit max_length)" if example.get("truncated") else "")
                + f", chosen {len(example['chosen_input_ids']) - n}, rejected "
                f"{len(example['rejected_input_ids']) - n} tokens"
                + (f", subset {example['subset']}" if example.get("subset") else ""),
                f"[{prompt}]", "chosen:   " + tokenizer.decode(example["chosen_input_ids"][n:]),
                "rejected: " + tokenizer.decode(example["rejected_input_ids"][n:])]
    return [f"prompt {len(example['input_ids'])} tokens (the policy writes the response)"
            + (f", subset {example['subset']}" if example.get("subset") else ""),
            f"[{tokenizer.decode(example['input_ids'])}]"]


def preview(args: list[str]) -> None:
    """`alpaca-rlhf data -c CONFIG [--show N] [--split train|val] [fit overrides]`."""
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    args, show = _take_flag(args, "--show", "3")
    args, split = _take_flag(args, "--split", "train")
    if split not in ("train", "val"):
        raise ConfigError(f"alpaca-rlhf data: --split is train or val, not {split!r}")
    try:
        n = int(show)
    except ValueError:
        raise ConfigError(f"alpaca-rlhf data: --show takes a number of examples, not {show!r}") from None
    from alpaca_rlhf.parsers import parse_fit_config

    datamodule = build_datamodule(parse_fit_config(args))
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    report = getattr(datamodule, "report", None)
    examples = datamodule.train_data if split == "train" else datamodule.val_data
    print(f"{type(datamodule).__name__} on {datamodule.data_path}")
    if report is not None:
        print(f"  {report.summary()}")
    print(f"  {len(datamodule.train_data)} train / {len(datamodule.val_data)} val examples; "
          f"batch size {datamodule.batch_size}")
    for i, example in enumerate(examples[:n]):
        lines = describe(tokenizer, example)
        print(f"\n--- {split} example {i + 1}: {lines[0]}")
        print("\n".join(lines[1:]))
