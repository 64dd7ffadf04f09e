"""The hemorrhage metric; its implementation lives in hemorrhage_hf.metric."""

from hemorrhage_hf.metric import Hemorrhage  # noqa: F401
