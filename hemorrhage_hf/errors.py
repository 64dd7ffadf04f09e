"""The documented errors: every bad input ends in one of these, with a message naming the problem."""


class HemorrhageError(ValueError):
    """Base class of all hemorrhage-hf input errors."""


class ModelLoadError(HemorrhageError):
    """A model name, path or Hub id could not be resolved or loaded."""


class TokenizerMismatchError(HemorrhageError):
    """The reference and modified models tokenize text differently."""


class CorpusError(HemorrhageError):
    """The text to measure on is missing, empty or too short."""


class SpecError(HemorrhageError):
    """A modification spec string is malformed or out of range."""


class ModificationError(HemorrhageError):
    """A modification cannot be applied to this model (no suitable layers, too little calibration data...)."""


class BackendError(HemorrhageError):
    """A quantization backend is not installed, refuses the options, or failed (the message names it and its fix)."""


class CorrectionError(HemorrhageError):
    """A decoding correction cannot be fitted, loaded or applied as asked."""
