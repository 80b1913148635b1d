import pytest

from alpaca_rlhf.data.templates import PromptTemplate


def test_alpaca_template_exact_strings():
    t = PromptTemplate.load("alpaca")
    assert t.render("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert t.render("Translate.", "Bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nBonjour\n\n### Response:\n"
    )
    assert t.response_split == "### Response:"


def test_empty_input_uses_no_input_form():
    t = PromptTemplate.load("alpaca")
    assert t.render("Hi", "") == t.render("Hi") and "### Input:" not in t.render("Hi", "")


def test_get_response_splits_on_marker():
    t = PromptTemplate.load("alpaca")
    assert t.get_response(t.render("Say hi") + " Hello there.") == "Hello there."


def test_template_from_file_and_errors(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"prompt_input": "{instruction}|{input}|", "prompt_no_input": "{instruction}|", '
                    '"response_split": "|"}')
    assert PromptTemplate.load(str(path)).render("a", "b") == "a|b|"
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt_input": "x"}')
    with pytest.raises(ValueError, match="prompt_no_input"):
        PromptTemplate.load(str(bad))
    with pytest.raises(FileNotFoundError):
        PromptTemplate.load("no-such-template")
