"""Errors raised on bad user input. Each message is one line naming the input and what was expected."""


class Qwen15Error(Exception):
    """Base of every error this package raises on purpose; the CLI prints it as one line."""


class ConfigError(Qwen15Error, ValueError):
    """A config that does not describe a model this package can run."""


class WeightsError(Qwen15Error, ValueError):
    """A checkpoint file that is missing, corrupt, truncated or does not match its config."""


class TokenizerError(Qwen15Error, ValueError):
    """A tokenizer file or chat template that cannot be used."""


class PullError(Qwen15Error, RuntimeError):
    """A model that could not be fetched, or whose download did not check out."""


class GenerationError(Qwen15Error, ValueError):
    """A generation request that cannot be served (prompt too long, bad sampling value, ...)."""


class EvalError(Qwen15Error, ValueError):
    """An evaluation request that cannot run: unknown task, bad option, missing data, bad samples."""
