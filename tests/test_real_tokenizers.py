"""Real tokenizers and a real model: SmolLM2 (GGUF, pad shipped as EOS, ChatML, tied embeddings), the real Llama 3
tokenizer (from Meta's `llama-models` package), and a Qwen-like tokenizer (pad == EOS, no unk)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from alpaca_rlhf.data.sft import IGNORE_INDEX, SFTCollator, tokenize_example
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.models import ModelSpec, ensure_pad_token, load_causal_lm, load_tokenizer
from alpaca_rlhf.ppo import first_eos_mask

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


# ---- SmolLM2 ------------------------------------------------------------------------------------------------
def test_gguf_is_dequantized_once_into_a_plain_folder(smol_gguf, smol_folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((smol_folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (smol_folder / "model.safetensors").is_file()
    cfg = AutoConfig.from_pretrained(smol_folder)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    stamp = (smol_folder / "model.safetensors").stat().st_mtime
    spec = ModelSpec(name_or_path=str(smol_gguf))
    model = load_causal_lm(spec, trainable=False)  # the .gguf name resolves to the same folder, no new conversion
    assert (smol_folder / "model.safetensors").stat().st_mtime == stamp
    assert model.num_parameters() == pytest.approx(134.5e6, rel=0.01)
    plain = AutoModelForCausalLM.from_pretrained(smol_folder)  # plain transformers loads the folder
    assert plain.get_output_embeddings().weight.data_ptr() == plain.get_input_embeddings().weight.data_ptr()


def test_smollm2_answers_sensibly_with_the_alpaca_template(smol_gguf):
    spec = ModelSpec(name_or_path=str(smol_gguf))
    tokenizer, model = load_tokenizer(spec), load_causal_lm(spec, trainable=False)
    prompt = PromptTemplate.load("alpaca").render("Give three tips for staying healthy.")
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "balanced diet" in answer.lower()


def test_smollm2_pad_rule_and_option(smol_gguf, caplog):
    with caplog.at_level(logging.INFO, logger="alpaca_rlhf.models"):
        tokenizer = load_tokenizer(ModelSpec(name_or_path=str(smol_gguf)))
    # shipped pad == EOS (<|im_end|>); the rule takes its unk <|endoftext|> instead, and says so
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", "<|endoftext|>", 0)
    assert "pads with '<|endoftext|>'" in caplog.text
    as_eos = load_tokenizer(ModelSpec(name_or_path=str(smol_gguf), pad_token="eos"))
    assert as_eos.pad_token_id == as_eos.eos_token_id == 2
    with pytest.raises(ValueError, match="not a token"):
        load_tokenizer(ModelSpec(name_or_path=str(smol_gguf), pad_token="<nope>"))


def test_chat_template_renders_chatml_exactly(smol_gguf):
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(smol_gguf)))
    chat = PromptTemplate.load("chat").bind(tokenizer)
    assert chat.render("Name a primary color.") == (
        SMOL_SYSTEM + "<|im_start|>user\nName a primary color.<|im_end|>\n<|im_start|>assistant\n")
    assert chat.render("Summarize.", "A long text.") == (
        SMOL_SYSTEM + "<|im_start|>user\nSummarize.\n\nA long text.<|im_end|>\n<|im_start|>assistant\n")
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "A color?"}]
    assert chat.render_messages(convo) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                           "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nA color?"
                                           "<|im_end|>\n<|im_start|>assistant\n")
    # the response is labelled and ends with the template's own end of turn (EOS = <|im_end|>)
    ex = tokenize_example(tokenizer, chat.render("Name a primary color."), "Red.", cutoff_len=256)
    labelled = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Red.<|im_end|>" and ex["input_ids"][-1] == 2
    assert tokenizer.decode(ex["input_ids"][: len(ex["input_ids"]) - len(labelled)]).endswith("assistant\n")
    with pytest.raises(RuntimeError, match="bind"):
        PromptTemplate.load("chat").render("x")


# ---- Llama 3 ------------------------------------------------------------------------------------------------
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory) -> Path:
    """Meta's Llama 3 tokenizer.model (tiktoken, shipped in `llama-models`) converted by transformers, saved with a
    tiny random LLaMA of that vocabulary."""
    llama_models = pytest.importorskip("llama_models", reason="pip install llama-models (dev extra)")
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    specials = LLAMA3_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
    from llama_models.llama3.tokenizer import Tokenizer

    backend = TikTokenConverter(vocab_file=str(model_file), pattern=Tokenizer.pat_str,
                                extra_special_tokens=specials).converted()
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>", model_max_length=8192)
    folder = tmp_path_factory.mktemp("llama3") / "tiny-llama3"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=128000, eos_token_id=128001)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_llama3_tokenizer_conventions(llama3_folder):
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(llama3_folder)))
    assert len(tokenizer) == 128256
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|finetune_right_pad_id|>", 128004)
    assert tokenizer("Hello world")["input_ids"] == [128000, 9906, 1917]  # as Meta's own tiktoken encoder


def test_sft_steps_on_a_tiny_model_with_the_llama3_vocabulary(llama3_folder):
    from alpaca_rlhf.data import AlpacaDataModule
    from alpaca_rlhf.models import LoraSpec
    from alpaca_rlhf.modules import SFTModule

    module = SFTModule(ModelSpec(name_or_path=str(llama3_folder)),
                       LoraSpec(r=4, alpha=8, dropout=0.0, target_modules="all-linear", modules_to_save=["lm_head"]))
    data = AlpacaDataModule("alpaca_rlhf/data/samples/alpaca_sample.json", cutoff_len=192, val_set_size=0,
                            batch_size=4, max_records=4)
    data.connect(module.tokenizer)
    data.setup()
    batch = data.collator()(data.train_data)
    assert batch["input_ids"][0, 0] == 128000 and (batch["labels"] == 128001).sum() == 4  # BOS once, EOS per row
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(*module.response_logits(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5 and abs(losses[0] - torch.log(torch.tensor(128256.0)).item()) < 1.0


# ---- a Qwen-like tokenizer: pad == EOS, no unk --------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_like():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from alpaca_rlhf.models import _corpus_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_texts("alpaca_rlhf/data/samples/alpaca_sample.json")[:50], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_pad_equal_to_eos_is_allowed_logged_and_the_masks_stay_right(qwen_like, caplog):
    assert qwen_like.unk_token is None and qwen_like.pad_token_id == qwen_like.eos_token_id
    with caplog.at_level(logging.INFO, logger="alpaca_rlhf.models"):
        tokenizer = ensure_pad_token(qwen_like)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and "EOS" in caplog.text
    eos = tokenizer.eos_token_id
    # SFT: the response's EOS is labelled once; padding (the same id) is neither attended nor labelled
    short = tokenize_example(tokenizer, "Say hi.\n", "Hi", 64)
    long = tokenize_example(tokenizer, "Say hello to everyone here.\n", "Hello to all of you", 64)
    batch = SFTCollator(tokenizer.pad_token_id)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"][0, n - 1] == eos and (batch["input_ids"][0, n:] == eos).all()
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0] == eos).sum() == 1 and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    # PPO: generated padding after EOS is EOS too; the response mask runs through the first EOS only
    responses = torch.tensor([[5, 6, eos, eos, eos], [7, eos, eos, eos, eos], [8, 9, 10, 11, 12]])
    assert first_eos_mask(responses, eos).tolist() == [[True, True, True, False, False],
                                                        [True, True, False, False, False], [True] * 5]


def test_a_reward_model_with_another_tokenizer_sees_eos_only_where_the_policy_stopped(llama3_folder, tiny_base,
                                                                                      tmp_path):
    """The RM re-tokenises the text when its vocabulary differs (here: the real Llama 3 tokenizer for the policy,
    the tiny RM's own). It appended EOS to every response, so an answer cut at max_new_tokens scored as a
    finished one; EOS now follows only a response that holds the policy's EOS."""
    from alpaca_rlhf.models import load_sequence_classifier
    from alpaca_rlhf.modules.scorers import RewardModelScorer, ScoringBatch

    rm_tokenizer = load_tokenizer(ModelSpec(name_or_path=str(tiny_base)))
    rm = load_sequence_classifier(ModelSpec(name_or_path=str(tiny_base)), pad_token_id=rm_tokenizer.pad_token_id)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.save_pretrained(tmp_path / "rm")
    rm_tokenizer.save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(ModelSpec(name_or_path=str(tmp_path / "rm")), center=False)
    policy = load_tokenizer(ModelSpec(name_or_path=str(llama3_folder)), padding_side="left")
    prompt = "### Instruction:\nName a colour.\n\n### Response:\n"
    prompt_ids = policy(prompt, add_special_tokens=False)["input_ids"]
    answer = policy("Red is a colour", add_special_tokens=False)["input_ids"]
    finished, cut = answer + [policy.eos_token_id], answer + [answer[-1]]  # the same width, one ended
    ids = torch.tensor([prompt_ids + finished, prompt_ids + cut])
    batch = ScoringBatch([prompt, prompt], ids, torch.ones_like(ids), len(prompt_ids), policy,
                         texts=["Red is a colour", "Red is a colour"])  # the same text: only the ending differs
    rm_ids, mask = scorer.retokenize(batch)
    lengths = mask.sum(1)
    assert rm_ids[0, lengths[0] - 1] == rm_tokenizer.eos_token_id
    assert rm_ids[1, lengths[1] - 1] != rm_tokenizer.eos_token_id and lengths[1] == lengths[0] - 1
    scores = scorer(batch)
    assert scores[0] != scores[1]  # the unfinished answer is scored as what it is


def test_the_gguf_tokenizer_keeps_smollms_declared_digit_split(smol_gguf, tmp_path):
    """SmolLM2's GGUF declares `tokenizer.ggml.pre = smollm` (every digit its own token); transformers' GGUF reader
    dropped it, so numbers tokenized otherwise than the model was trained on. The conversion restores it."""
    from alpaca_rlhf.models import gguf_folder, gguf_pre_tokenizer

    assert gguf_pre_tokenizer(smol_gguf) == "smollm"
    folder = gguf_folder(ModelSpec(name_or_path=str(smol_gguf), gguf_cache=str(tmp_path)), str(smol_gguf))
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(folder)))
    ids = tokenizer("In 2024 it cost 1350 dollars.", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p.strip() for p in pieces if p.strip().isdigit()] == list("2024") + list("1350"), pieces
    assert tokenizer.decode(ids) == "In 2024 it cost 1350 dollars."
    record = json.loads((folder / "converted_from.json").read_text())
    assert record["converter"] >= 2 and record["fingerprint"]


# ---- chat templates end a turn with their own token (Llama 3: <|eot_id|>, not <|end_of_text|>) ---------------
# Meta's Llama 3 Instruct chat template (tokenizer_config.json of Meta-Llama-3-8B-Instruct)
LLAMA3_CHAT = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
EOT, END_OF_TEXT = 128009, 128001


@pytest.fixture(scope="module")
def llama3_chat_folder(llama3_folder, tmp_path_factory) -> Path:
    """The Llama 3 vocabulary with Meta's chat template, and a tiny model rigged to say <|eot_id|> at once: every
    position sees the same hidden state (one embedding row for all tokens, attention and MLP outputs zeroed), and
    lm_head's <|eot_id|> row points along it."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama3-chat") / "tiny-llama3-chat"
    tokenizer = AutoTokenizer.from_pretrained(llama3_folder)
    tokenizer.chat_template = LLAMA3_CHAT
    tokenizer.save_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(llama3_folder)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[:1].expand_as(
            model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        h = model.model.norm(model.model.embed_tokens.weight[:1])[0]
        model.lm_head.weight[EOT] = 100 * h / h.norm()
    model.save_pretrained(folder)
    return folder


def test_chat_template_responses_end_with_the_end_of_turn_token(llama3_chat_folder):
    """Issue 23 #7: under `template: chat` a Llama 3 response was trained to end with <|end_of_text|>; Meta's
    format ends an assistant turn with <|eot_id|>. SFT labels and RM / DPO pairs now end with the template's own
    end of turn, read from its rendering of a whole conversation."""
    from alpaca_rlhf.data import AlpacaDataModule
    from alpaca_rlhf.data.preference import PreferenceDataModule

    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(llama3_chat_folder)))
    chat = PromptTemplate.load("chat").bind(tokenizer)
    assert chat.end_of_turn_ids() == [EOT] and chat.stop_token_ids() == [EOT, END_OF_TEXT]
    assert PromptTemplate.load("alpaca").end_of_turn_ids(tokenizer) == [END_OF_TEXT]  # a text template keeps EOS
    prompt = chat.render("Name a primary color.")
    ex = tokenize_example(tokenizer, prompt, "Red.", 256, end_ids=chat.end_of_turn_ids())
    # prompt + response ids are exactly the template's rendering of the whole conversation
    whole = tokenizer.apply_chat_template([{"role": "user", "content": "Name a primary color."},
                                           {"role": "assistant", "content": "Red."}], tokenize=False)
    assert ex["input_ids"] == tokenizer(whole, add_special_tokens=False)["input_ids"]
    data = AlpacaDataModule("alpaca_rlhf/data/samples/alpaca_sample.json", template="chat", cutoff_len=512,
                            val_set_size=0, batch_size=4, max_records=6)
    data.connect(tokenizer)
    data.setup()
    for row in data.train_data:
        labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert labelled[-1] == EOT and END_OF_TEXT not in labelled
    pairs = PreferenceDataModule("alpaca_rlhf/data/samples/preferences_sample.jsonl", format="seed", template="chat",
                                 max_length=512, val_set_size=0, batch_size=4, max_records=6)
    pairs.connect(tokenizer)
    pairs.setup()
    for row in pairs.train_data:
        assert row["chosen_input_ids"][-1] == row["rejected_input_ids"][-1] == EOT


def test_generation_and_rollouts_stop_at_the_end_of_turn_token(llama3_chat_folder, tmp_path):
    """Issue 23 #7: end of turn is a stop token in `generate`, `compare` and the RL rollout; before, a model that
    ended its turn kept generating to max_new_tokens and counted as unfinished."""
    from alpaca_rlhf.inference.generation import SamplingSpec, generate_responses
    from alpaca_rlhf.models import LoraSpec
    from alpaca_rlhf.modules import PPOModule
    from alpaca_rlhf.modules.online import GenerationHParams
    from alpaca_rlhf.modules.scorers import TokenIdScorer

    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(llama3_chat_folder)), padding_side="left")
    model = load_causal_lm(ModelSpec(name_or_path=str(llama3_chat_folder)), trainable=False)
    chat = PromptTemplate.load("chat").bind(tokenizer)
    prompts = [chat.render("Name a primary color."), chat.render("Say hi.")]
    out = generate_responses(model, tokenizer, prompts, SamplingSpec(max_new_tokens=6), stop_ids=chat.stop_token_ids())
    assert [g.response_ids for g in out] == [[EOT], [EOT]] and all(g.ended and g.text == "" for g in out)

    module = PPOModule(policy=ModelSpec(name_or_path=str(llama3_chat_folder)), scorer=TokenIdScorer([EOT]),
                       lora=LoraSpec(r=2, alpha=4, dropout=0.0), template="chat",
                       generation=GenerationHParams(max_new_tokens=6), output_dir=str(tmp_path / "ppo"),
                       log_samples_every=0)
    enc = module.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    responses, mask, _ = module.generate(enc["input_ids"], enc["attention_mask"])
    assert mask.sum(1).tolist() == [1, 1] and (responses[:, 0] == EOT).all()
    assert (responses[:, 1:] == module.tokenizer.pad_token_id).all()  # nothing after the end of turn


QWEN_JUDGE = Path(os.environ.get("ALPACA_RLHF_CACHE", Path.home() / ".cache/alpaca_rlhf"),
                  "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


@pytest.mark.skipif(not QWEN_JUDGE.is_file(), reason=f"the judge model is not fetched ({QWEN_JUDGE}); run "
                    "../shared/tools/get-judge-model.sh")
@pytest.mark.slow
def test_qwen_chatml_responses_end_with_im_end_as_the_template_renders_them():
    """Issue 23 #7 on the real Qwen2.5 tokenizer (the judge model's GGUF): ChatML ends an assistant turn with
    <|im_end|>, and prompt + response ids are exactly the template's ids for the finished conversation."""
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(QWEN_JUDGE)))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat = PromptTemplate.load("chat").bind(tokenizer)
    assert chat.end_of_turn_ids() == [im_end] and im_end in chat.stop_token_ids()
    messages = [{"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": "Red."}]
    ex = tokenize_example(tokenizer, chat.render("Name a primary color."), "Red.", 256,
                          end_ids=chat.end_of_turn_ids())
    whole = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert whole[: len(ex["input_ids"])] == ex["input_ids"]  # the template may add a newline after <|im_end|>
    assert [t for t in ex["labels"] if t != IGNORE_INDEX][-1] == im_end
