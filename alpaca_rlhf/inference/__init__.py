"""Generation from any stage's checkpoint, and the base vs SFT vs RLHF comparison.

    alpaca-rlhf generate --mode ppo --ppo_model_path output/tiny/ppo_checkpoints --instruction "Hello"
    alpaca-rlhf compare --config configs/tiny/compare.yaml

One job per module:
- `checkpoints`: which weights a stage's output means, and loading them. A checkpoint is a base folder (or hub
  id) with an optional PEFT adapter on top: the base model itself, the SFT adapter on its base or the merged SFT
  folder, or a PPO export `step_<n>` (adapter on the merged SFT model named in its `ppo_state.json`);
- `generation`: sampling settings and batched generation (prompts use the checkpoint's own `template.json`,
  Alpaca when there is none; only the response is returned), response log-probabilities, `generate`;
- `comparison`: held-out prompts, scoring by the reward model and the judge, KL to SFT, the reward-hacking
  diagnostics, `compare`;
- `report`: `report.md` and the terminal table.
"""

from alpaca_rlhf.inference.checkpoints import (
    MODES,
    STAGE_TITLES,
    STAGES,
    Checkpoint,
    detect_checkpoint,
    latest_export,
    load_checkpoint,
    resolve_base,
    resolve_checkpoint,
)
from alpaca_rlhf.inference.comparison import (
    PromptSource,
    build_rows,
    compare,
    distinct_n,
    follows_template,
    hacking_flags,
    held_out_records,
    score_generations,
    summarize,
    win_rate,
)
from alpaca_rlhf.inference.generation import (
    Generation,
    SamplingSpec,
    chat_loop,
    generate,
    generate_responses,
    pad_prompt_responses,
    read_instructions,
    response_logprob_sums,
)
from alpaca_rlhf.inference.report import markdown_report, terminal_table

__all__ = [
    "MODES", "STAGES", "STAGE_TITLES", "Checkpoint", "detect_checkpoint", "latest_export", "load_checkpoint",
    "resolve_base", "resolve_checkpoint", "PromptSource", "build_rows", "compare", "distinct_n", "follows_template",
    "hacking_flags", "held_out_records", "score_generations", "summarize", "win_rate", "Generation", "SamplingSpec",
    "chat_loop", "generate", "generate_responses", "pad_prompt_responses", "read_instructions",
    "response_logprob_sums", "markdown_report", "terminal_table",
]
