"""Memory preflight: the peak accelerator memory a stage will need, estimated from its config alone.

    alpaca-rlhf preflight -c configs/ppo.yaml                 # against this machine's GPU, or
    alpaca-rlhf preflight -c configs/ppo.yaml --budget_gb 24  # against a card you do not have here
    alpaca-rlhf preflight -c configs/sft.yaml --data.init_args.batch_size 8   # any fit override

One line per component: weights (by dtype and quantization), LoRA and value head, gradients and optimizer state,
activations (with and without gradient checkpointing), the generation KV cache, and the logits at the kept
positions. The model's shape comes from its `config.json` (a folder, a converted `.gguf`, the hub cache, or the
shapes listed in `KNOWN_SHAPES`); no weights are loaded. `fit` runs the same estimate before training: it warns,
and refuses when the estimate is clearly over the budget (`--preflight warn|off` overrides).

The estimate is for the worst batch the config allows (every sequence at its length limit, every position
labelled), the peak of one optimizer step. It counts tensors, not the allocator's slack or the CUDA context
(~0.3-0.5 GiB on a GPU): hold it against measured peaks with `python bench/memory.py`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.exports import MERGED_SUFFIX, adapter_of_merged

GIB = 1024**3
BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# shapes of models named in the shipped configs, for machines without the hub (config.json facts)
KNOWN_SHAPES = {
    "meta-llama/Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    tie_word_embeddings=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                                tie_word_embeddings=True),
}


@dataclass
class Shape:
    """What memory depends on in a LLaMA-style decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    def params(self) -> dict[str, int]:
        linear = self.layers * sum(a * b for a, b in self.linear_shapes().values())
        embed = self.vocab * self.hidden
        return {"linear": linear, "embed": embed, "lm_head": 0 if self.tied else embed,
                "norms": (2 * self.layers + 1) * self.hidden}


def _adapter_base(path: Path) -> str | None:
    config = (adapter_of_merged(path) or path) / "adapter_config.json"  # a merged folder's adapter, or an adapter
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None


def shape_of(spec, fallback: str | None = None) -> Shape:
    """The shape of a `ModelSpec` (an object or a dict with its fields), from config.json without weights;
    `fallback` names the model whose shape a not-yet-written stage output will have (e.g. the base of SFT)."""
    get = (lambda k, d=None: spec.get(k, d)) if isinstance(spec, dict) else (lambda k, d=None: getattr(spec, k, d))
    name = str(get("name_or_path"))
    config = None
    path = Path(name)
    if name.endswith(".gguf") and path.is_file():
        from alpaca_rlhf.models import ModelSpec, gguf_folder

        path = gguf_folder(ModelSpec(name_or_path=name, gguf_cache=get("gguf_cache")), name)
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    elif get("tiny") is not None:
        from alpaca_rlhf.models import TINY_LLAMA

        config = {**TINY_LLAMA, **(get("tiny") or {}), "vocab_size": get("tiny_vocab_size", 1024)}
    elif name in KNOWN_SHAPES:
        config = KNOWN_SHAPES[name]
    elif _adapter_base(path) is not None:  # a merged folder not written yet: its adapter's recorded base
        return shape_of({"name_or_path": _adapter_base(path)})
    elif fallback is not None:
        return shape_of({"name_or_path": fallback})
    else:
        from alpaca_rlhf.models import looks_local

        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name, local_files_only=True).to_dict()
        except Exception as e:
            stage_output = name.endswith(MERGED_SUFFIX) or looks_local(name)
            hint = ("it looks like an earlier stage's output that is not written yet: run that stage first, or "
                    "give the shape it will have with --model_shape NAME (the model that stage starts from, e.g. "
                    "the SFT config's model_name_or_path)" if stage_output else
                    "give a local folder, or its shape with --model_shape NAME")
            raise FileNotFoundError(f"preflight: no config.json for {name!r} (not a folder, not in the hub cache, "
                                    f"not one of the known shapes {', '.join(sorted(KNOWN_SHAPES))}): {hint}") from e
    heads = config["num_attention_heads"]
    return Shape(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], heads,
                 config.get("num_key_value_heads") or heads, config["vocab_size"],
                 bool(config.get("tie_word_embeddings", False)))


@dataclass
class Estimate:
    stage: str
    lines: list[tuple[str, float, str]] = field(default_factory=list)  # (component, bytes, how)

    def add(self, component: str, n_bytes: float, how: str) -> None:
        self.lines.append((component, float(n_bytes), how))

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.lines)

    def table(self, budget_gb: float | None = None) -> str:
        width = max(len(c) for c, _, _ in self.lines)
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)
        rows = [f"preflight ({self.stage}): estimated peak memory of one optimizer step"]
        rows += [f"  {c:{width}s} {b / scale:8.2f} {unit}  {how}" for c, b, how in self.lines]
        rows.append(f"  {'total':{width}s} {self.total / scale:8.2f} {unit}")
        if budget_gb:
            verdict = "fits" if self.total <= budget_gb * GIB else "DOES NOT FIT"
            rows.append(f"  budget {budget_gb:.1f} GiB: {verdict} ({self.total / (budget_gb * GIB):.0%} of it)")
        return "\n".join(rows)


def weight_bytes(shape: Shape, dtype: str, quantization: str | None, score_head: bool = False,
                 trainable: bool = False) -> tuple[float, str]:
    """Bytes of the frozen weights; a reward model (`score_head`) has a one-output head instead of lm_head. A
    quantized model that trains (`trainable`) went through PEFT's `prepare_model_for_kbit_training`, which casts
    every weight it did not quantize (embeddings, lm_head, norms) to fp32."""
    from alpaca_rlhf.models import null_to_none

    quantization = null_to_none(quantization)
    p = shape.params()
    if score_head:
        p["lm_head"] = shape.hidden
    dense = BYTES[dtype]
    kbit_fp32 = quantization is not None and trainable
    other = (p["embed"] + p["lm_head"] + p["norms"]) * (4 if kbit_fp32 else dense)  # bnb quantizes Linear only
    cast = "; embeddings, lm_head and norms cast to fp32 for k-bit training" if kbit_fp32 else ""
    if quantization == "8bit":
        return p["linear"] * 1.0 + other, f"{sum(p.values()) / 1e6:.0f}M params, linear layers 8-bit{cast}"
    if quantization == "4bit":  # 4 bits + an fp32 absmax per block of 64 (nested quantization ignored)
        return (p["linear"] * (0.5 + 4 / 64) + other,
                f"{sum(p.values()) / 1e6:.0f}M params, linear layers 4-bit{cast}")
    return sum(p.values()) * dense, f"{sum(p.values()) / 1e6:.0f}M params in {dtype}"


def lora_params(shape: Shape, lora) -> int:
    get = (lambda k, d=None: lora.get(k, d)) if isinstance(lora, dict) else (lambda k, d=None: getattr(lora, k, d))
    targets = get("target_modules", ["q_proj", "v_proj"])
    names = LINEAR_NAMES if targets == "all-linear" else [t for t in targets if t in LINEAR_NAMES]
    r = get("r", 8)
    n = shape.layers * sum(r * sum(shape.linear_shapes()[t]) for t in names)
    if targets != "all-linear" and "lm_head" in targets:
        n += r * (shape.hidden + shape.vocab)
    for module in get("modules_to_save") or []:  # trained in full: a copy of the module
        if module in ("lm_head", "embed_tokens"):
            n += shape.vocab * shape.hidden
    return n


def activation_bytes(shape: Shape, tokens: int, act: int, checkpointing: bool) -> tuple[float, str]:
    """Tensors autograd keeps for backward through a LoRA'd decoder (frozen base), for `tokens` tokens.

    Per layer and token: the residual and both norms' inputs (fp32), the projections' inputs (LoRA needs them),
    q/k/v and the attention output (SDPA), and the MLP's gate, up, SiLU and product: about
    6H + 2*kv + 4I elements. With checkpointing only each layer's input stays, plus one layer recomputed.
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_layer = tokens * ((2 * h) * 4 + (4 * h + 2 * kv + 4 * i) * act)
    if checkpointing:
        return shape.layers * tokens * h * act + per_layer, "checkpointed: layer inputs + one layer recomputed"
    return shape.layers * per_layer, f"{shape.layers} layers x (6H + 2kv + 4I) per token"


def activation_width(mixed: bool, dtype: str, quantization: str | None) -> int:
    """Bytes per activation element. A quantized model that trains runs its residual stream in fp32: PEFT's k-bit
    preparation casts the embeddings and norms to fp32, and bitsandbytes' layers return their input's dtype, so
    the projections' outputs, attention and MLP tensors are fp32 too, mixed precision or not."""
    from alpaca_rlhf.models import null_to_none

    if null_to_none(quantization) is not None:
        return 4
    return 2 if (mixed or BYTES[dtype] == 2) else 4


def _get(node, dotted: str, default=None):
    for key in dotted.split("."):
        if node is None:
            return default
        node = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
    return default if node is None else node


def _optimizer_bytes_per_param(config) -> tuple[int, str]:
    name = str(_get(config, "model.init_args.optimizer.class_path", "torch.optim.AdamW"))
    if "8bit" in name.lower():
        return 2, f"{name.rsplit('.', 1)[-1]}: two 8-bit states"
    if "SGD" in name:
        return 4, "SGD: one momentum state"
    return 8, f"{name.rsplit('.', 1)[-1]}: two fp32 states"


def estimate(config, model_shape: str | None = None) -> Estimate:
    """The estimate for a `fit` config (as `alpaca_rlhf.cli.parse_fit_config` resolves it); `model_shape` names
    the model whose shape a stage output that does not exist yet will have."""
    cls = str(_get(config, "model.class_path", ""))
    args = _get(config, "model.init_args")
    data = _get(config, "data.init_args")
    precision = str(_get(config, "trainer.precision", "32-true"))
    mixed = precision == "auto" or precision.startswith(("bf16", "16"))  # auto on a GPU: bf16 or fp16 mixed
    online = online_stage(cls)  # an online stage: sampling, a rollout, a policy loss
    if online is not None:
        return _ppo(args, data, mixed, config, model_shape, *online)
    stage = "reward model" if cls.endswith("RewardModule") else "DPO" if cls.endswith("DPOModule") else "SFT"
    spec = _get(args, "model")
    shape = shape_of(spec, model_shape)
    dtype = str(_get(spec, "dtype", "float32"))
    act = activation_width(mixed, dtype, _get(spec, "quantization"))
    est = Estimate(stage)
    weights, how = weight_bytes(shape, dtype, _get(spec, "quantization"), score_head=stage == "reward model",
                                trainable=True)
    est.add("weights", weights, how)
    trainable = lora_params(shape, _get(args, "lora", {})) + (shape.hidden + 1 if stage == "reward model" else 0)
    est.add("LoRA (+ score head)", trainable * BYTES[dtype], f"{trainable / 1e6:.2f}M trainable"
            + ("; the reference is the model with its adapter disabled" if stage == "DPO" else ""))
    est.add("gradients", trainable * BYTES[dtype], "one per trainable parameter")
    per_param, opt_how = _optimizer_bytes_per_param(config)
    est.add("optimizer state", trainable * per_param, opt_how)
    batch = int(_get(data, "batch_size", 4))
    length = int(_get(data, "cutoff_len" if stage == "SFT" else "max_length", 512))
    sequences = batch if stage == "SFT" else 2 * batch  # pairs: chosen and rejected in one forward
    ckpt = bool(_get(spec, "gradient_checkpointing", False))
    acts, act_how = activation_bytes(shape, sequences * length, act, ckpt)
    other, _ = activation_bytes(shape, sequences * length, act, not ckpt)
    est.add("activations", acts, f"{sequences} x {length} tokens, {act_how} "
                                 f"({other / GIB:.2f} GiB {'without' if ckpt else 'with'} checkpointing)")
    if stage in ("SFT", "DPO"):  # logits at the labelled positions: the model's dtype, fp32 copy, log-softmax + grad
        est.add("logits", sequences * length * shape.vocab * (act + 4 + 4),
                f"{sequences} x {length} positions x {shape.vocab} vocabulary (fp32 loss)")
    return est


def online_stage(class_path: str) -> tuple[str, str, bool, int] | None:
    """(name, the hyperparameters' argument, has a value model, its default completions per prompt) of an online
    RL module class (PPO, RLOO, GRPO, REINFORCE++ or any `OnlineRLModule` subclass), read from the class itself;
    None for any other class."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    from alpaca_rlhf.modules.critic_free import CriticFreeModule
    from alpaca_rlhf.modules.online import OnlineRLModule, RolloutHParams

    if not (isinstance(cls, type) and issubclass(cls, OnlineRLModule)):
        return None
    for parameter in inspect.signature(cls.__init__).parameters.values():
        if isinstance(parameter.default, RolloutHParams):
            k = int(getattr(parameter.default, "num_generations", 1))
            return cls.ALGORITHM.upper(), parameter.name, not issubclass(cls, CriticFreeModule), k
    return None


def _ppo(args, data, mixed: bool, config, model_shape: str | None = None, name: str = "PPO", hp: str = "ppo",
         critic: bool = True, default_k: int = 1) -> Estimate:
    """An online stage (PPO, RLOO, GRPO, ...): critic-free ones have no value head and sample `num_generations`
    per prompt; `hp` is the hyperparameters' argument (ppo, rloo, grpo, ...)."""
    est = Estimate(name)
    policy = _get(args, "model") or _get(args, "policy")  # policy: the old name
    shape = shape_of(policy, model_shape)
    dtype = str(_get(policy, "dtype", "float32"))
    act = activation_width(mixed, dtype, _get(policy, "quantization"))
    weights, how = weight_bytes(shape, dtype, _get(policy, "quantization"), trainable=True)
    est.add("policy weights", weights, how + "; the reference is the policy with its adapter disabled")
    ref = _get(args, "ref_model")
    if ref is not None:
        ref_weights, ref_how = weight_bytes(shape_of(ref, model_shape), str(_get(ref, "dtype", dtype)),
                                            _get(ref, "quantization"))
        est.add("reference weights", ref_weights, ref_how)
    scorer_spec = _get(args, "scorer.init_args.model")
    if scorer_spec is not None:
        rm_shape = shape_of(scorer_spec, model_shape)
        rm_weights, rm_how = weight_bytes(rm_shape, str(_get(scorer_spec, "dtype", "float32")),
                                          _get(scorer_spec, "quantization"), score_head=True)
        est.add("reward-model weights", rm_weights, rm_how)
    trainable = lora_params(shape, _get(args, "lora", {})) + (shape.hidden + 1 if critic else 0)  # + value head
    est.add("LoRA + value head" if critic else "LoRA", trainable * BYTES[dtype], f"{trainable / 1e6:.2f}M trainable")
    est.add("gradients", trainable * BYTES[dtype], "one per trainable parameter")
    per_param, opt_how = _optimizer_bytes_per_param(config)
    est.add("optimizer state", trainable * per_param, opt_how)
    k = 1 if critic else int(_get(args, f"{hp}.num_generations", default_k))
    batch = int(_get(data, "batch_size", 16)) * k  # completions per iteration
    prompt = int(_get(data, "max_prompt_length", 256))
    new = int(_get(args, "generation.max_new_tokens", 128))
    mini = _get(args, f"{hp}.mini_batch_size") or batch
    micro = max(1, int(mini) // int(_get(args, f"{hp}.gradient_accumulation_steps", 1)))
    forward = min(batch, int(_get(args, f"{hp}.forward_batch_size", 16)))
    length = prompt + new
    est.add("generation KV cache", 2 * shape.layers * shape.kv_dim * length * batch * act,
            f"{batch} rollouts x {length} positions, keys and values of {shape.layers} layers")
    ckpt = bool(_get(policy, "gradient_checkpointing", False))
    acts, act_how = activation_bytes(shape, micro * length, act, ckpt)
    other, _ = activation_bytes(shape, micro * length, act, not ckpt)
    est.add("activations", acts, f"micro-batch {micro} x {length} tokens, {act_how} "
                                 f"({other / GIB:.2f} GiB {'without' if ckpt else 'with'} ckpt)")
    train_logits = micro * new * shape.vocab * (act + 4 + 4)  # response positions: dtype, fp32 log-softmax, grad
    rollout_logits = forward * new * shape.vocab * (act + 4)  # no-grad forwards of the rollout
    est.add("logits", max(train_logits, rollout_logits),
            f"response positions only ({new}) x {shape.vocab} vocabulary, training micro-batch {micro} / "
            f"rollout forward {forward}")
    return est


def device_budget_gb() -> float | None:
    """Total memory of this process's CUDA device, in GiB (None without one)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def check(config, mode: str = "check", budget_gb: float | None = None, margin: float = 1.15) -> Estimate | None:
    """The start-of-fit check: log the estimate; with `mode` "check", refuse when it is over `margin` x the
    budget (the device's memory, or `budget_gb`). "warn" only warns; "off" skips it."""
    if mode == "off":
        return None
    log = logging.getLogger(__name__)
    try:
        est = estimate(config)
    except Exception as e:  # a shape it cannot read must not stop training
        log.warning("preflight: no estimate (%s); --preflight off silences this", e)
        return None
    budget = budget_gb or device_budget_gb()
    log.info("%s", est.table(budget))
    if budget and est.total > margin * budget * GIB:
        message = (f"preflight: the estimated peak, {est.total / GIB:.1f} GiB, is over the {budget:.1f} GiB "
                   f"budget (x{margin}); lower the batch size or lengths, quantize, or turn on gradient "
                   f"checkpointing. --preflight warn starts anyway.\n{est.table(budget)}")
        if mode == "check":
            raise ConfigError(message)
        log.warning("%s", message)
    return est
