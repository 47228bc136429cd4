"""DataModules: synthetic ICL tasks, and k-shot text prompts for probing and finetuning LMs.

All training streams come from :mod:`lcd.data.stream` (seeded, resumable, DDP-aware).
"""

from lcd.data.synthetic import SyntheticICLDataModule, fixed_batches
from lcd.data.text import FinetuneDataModule, ICLTextDataModule, encode_prompts

__all__ = ["FinetuneDataModule", "ICLTextDataModule", "SyntheticICLDataModule", "encode_prompts", "fixed_batches"]
