"""Data: templates, record loading with validation, and the stages' LightningDataModules.

The names load on first use (PEP 562), so `alpaca_rlhf.data.templates` alone does not import Lightning (the
command line's help stays fast).
"""

from importlib import import_module

_WHERE = {"PreferenceDataModule": "preference", "PromptDataModule": "prompts", "DataValidationError": "records",
          "AlpacaDataModule": "sft", "PromptTemplate": "templates"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"alpaca_rlhf.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'alpaca_rlhf.data' has no attribute {name!r}")
