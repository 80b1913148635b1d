"""What every adapter-training stage does alike: its optimizer and schedule, adapter-sized checkpoints with no
NaN weights, and an export folder that does not hold its own logs."""

from __future__ import annotations

from alpaca_rlhf.guards import assert_finite
from alpaca_rlhf.models import adapter_sized
from alpaca_rlhf.schedules import scheduler_config


def build_optimizers(module, parameters):
    """`module.optimizer_fn` over the trainable `parameters`, with `module.scheduler_fn` stepped every optimizer
    step when there is one."""
    optimizer = module.optimizer_fn([p for p in parameters if p.requires_grad])
    if module.scheduler_fn is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": scheduler_config(module.scheduler_fn(optimizer), module.trainer)}


def trim_checkpoint(module, checkpoint: dict) -> None:
    """Trainable weights only (the base comes from the model spec) and never a NaN/inf one."""
    adapter_sized(module, checkpoint)
    assert_finite(checkpoint["state_dict"], "checkpoint")


class AdapterStage:
    """Mixed into SFT, reward-model and DPO modules (before `L.LightningModule`); they set `adapter_dir`,
    `optimizer_fn` and `scheduler_fn`."""

    def on_fit_start(self) -> None:
        from alpaca_rlhf.io import check_logs_outside

        check_logs_outside(self, self.adapter_dir, "model.adapter_dir")

    def configure_optimizers(self):
        return build_optimizers(self, self.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trim_checkpoint(self, checkpoint)
