"""Data: templates, record loading with validation, and the stages' LightningDataModules."""

from alpaca_rlhf.data.preference import PreferenceDataModule
from alpaca_rlhf.data.prompts import PromptDataModule
from alpaca_rlhf.data.records import DataValidationError
from alpaca_rlhf.data.sft import AlpacaDataModule
from alpaca_rlhf.data.templates import PromptTemplate

__all__ = ["AlpacaDataModule", "DataValidationError", "PreferenceDataModule", "PromptDataModule", "PromptTemplate"]
