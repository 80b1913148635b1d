"""What every adapter-training stage does alike: its optimizer and schedule, adapter-sized checkpoints with no
NaN weights, and an export folder that does not hold its own logs."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

from alpaca_rlhf.guards import assert_finite
from alpaca_rlhf.io import check_logs_outside
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


def adapter_export_folder(output_dir: str, adapter_dir: str | None) -> str:
    """The stage's export folder: `output_dir` (every stage's name for it), or `adapter_dir`, its old name here,
    when a config still gives that."""
    if adapter_dir is None:
        return output_dir
    rank_zero_warn(f"model.adapter_dir is the old name of model.output_dir (every stage's export folder): "
                   f"exporting to {adapter_dir}; rename the key")
    return adapter_dir


class AdapterStage:
    """Mixed into SFT, reward-model and DPO modules (before `L.LightningModule`); they set `output_dir` (also
    readable as `adapter_dir`), `optimizer_fn` and `scheduler_fn`."""

    @property
    def adapter_dir(self) -> str:
        """The export folder by its old name."""
        return self.output_dir

    def on_fit_start(self) -> None:
        check_logs_outside(self, self.output_dir, "model.output_dir")

    def configure_optimizers(self):
        return build_optimizers(self, self.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trim_checkpoint(self, checkpoint)
